# cython: language_level=3
"""Frame fan-out: connections, subscription groups, the deadline heap, sockets.

The per-frame hot path lives here: `Hub.pump` turns dirty bits into due
connections (through the groups that hold each instrument), pops them from a
deadline heap, has the kind build each distinct frame once (from its cached
row encodings) and writes it to every socket that shares it.

A connection's pending set is derived, not stored: the items of its
subscription group whose change stamp is newer than the version of its last
frame. That is what makes conflation free (nothing queues per client) and what
lets connections of one group that were served together share one frame.

The hub reads a kind only through the `Kind` interface of _table.pxd.
"""

cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.list cimport PyList_GET_ITEM
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset
from picows.picows cimport WSMsgType, WSTransport

from fastfeed._defs cimport (
    CLOCK_MONOTONIC, CLOCK_REALTIME, FF_DEBUG, HEADROOM, __builtin_ctzll, _clock, _grow,
)
from fastfeed._table cimport Kind

import numpy as np


cdef int _overrun(str what, Py_ssize_t n, Py_ssize_t bound) except -1:
    # out of line, so the hot path it guards (in debug builds) stays free of Python
    raise AssertionError(f"{what} of {n} bytes overran its bound of {bound}")


cdef bint writable(WSTransport tr) noexcept:
    """False once the connection is lost or its close frame is sent.

    picows sets `is_disconnected` only when the loop delivers connection_lost,
    one loop pass after the socket failed; until then the transport under it
    says `is_closing()`, and every write to it is dropped with a warning.
    """
    if tr.is_disconnected or tr.is_close_frame_sent:
        return False
    try:
        return not tr.underlying_transport.is_closing()
    except BaseException:
        return False


def connected(WSTransport tr not None):
    """True while `tr` may still be written to (a close frame included)."""
    if tr.is_disconnected:
        return False
    return not tr.underlying_transport.is_closing()


def can_send(WSTransport tr not None):
    """True while `tr` takes messages: connected and no close frame sent yet."""
    return writable(tr)


@cython.final
cdef class Hub:
    """Connections, their subscription groups and the frame scheduler.

    The server registers each socket with `add`; the event loop calls `pump`
    every frame tick (and at once when a watched instrument changed).
    """

    def __cinit__(self, Kind table, int64_t slack_ns=1_000_000):
        self.table = table
        self.transports = []
        self.capture = None
        self.nconns_cap = 0
        self.nfree_conns = 0
        self.nconns = 0
        self.ngroups_cap = 0
        self.nfree_groups = 0
        self.group_keys = {}
        self.inst_cap = 0
        self.heap_n = 0
        self.heap_cap = 0
        self.arena_len = 0
        self.arena_cap = 0
        self.pump_no = 0
        self.slack = slack_ns
        self.floor_ns = 0
        self.lat_ring = <int64_t*>malloc(256 * 8)
        self.lat_n = 0

    def __init__(self, Kind table, int64_t slack_ns=1_000_000):
        pass

    def __dealloc__(self):
        cdef Py_ssize_t i
        for i in range(self.ngroups_cap):
            free(self.groups[i].ids)
        for i in range(self.inst_cap):
            free(self.rev[i])
            free(self.wrev[i])
        free(self.conns)
        free(self.free_conns)
        free(self.groups)
        free(self.free_groups)
        free(self.rev)
        free(self.rev_n)
        free(self.rev_cap)
        free(self.wrev)
        free(self.wrev_n)
        free(self.wrev_cap)
        free(self.heap)
        free(self.arena)
        free(self.lat_ring)

    # -- connections

    def add(self, transport, int64_t interval_ns, bint binary=False, int64_t mono=0):
        """Register a connection; returns its id. `transport` is a picows WSTransport.

        `mono` (tests only) stands in for the monotonic clock.
        """
        cdef int32_t cid
        cdef Conn* c
        if self.nfree_conns:
            self.nfree_conns -= 1
            cid = self.free_conns[self.nfree_conns]
            self.transports[cid] = transport
        else:
            if <Py_ssize_t>len(self.transports) >= self.nconns_cap:
                n = max(64, self.nconns_cap * 2)
                self.conns = <Conn*>_grow(self.conns, self.nconns_cap * sizeof(Conn),
                                          n * sizeof(Conn), 0)
                self.free_conns = <int32_t*>_grow(self.free_conns, self.nconns_cap * 4, n * 4, 0)
                self.nconns_cap = n
            cid = <int32_t>len(self.transports)
            self.transports.append(transport)
        c = &self.conns[cid]
        memset(c, 0, sizeof(Conn))
        c.group = -1
        c.gnext = c.gprev = -1
        c.flags = F_ACTIVE | (F_BINARY if binary else 0)
        c.interval = interval_ns
        c.sent_ver = self.table.version
        c.last_send = mono or _clock(CLOCK_MONOTONIC)
        self.nconns += 1
        return cid

    def remove(self, int32_t cid):
        """Forget a connection (after its socket closed). Idempotent."""
        cdef Conn* c = &self.conns[cid]
        if not c.flags & F_ACTIVE:
            return
        self._leave_group(cid)
        c.flags = 0
        self.transports[cid] = None
        self.free_conns[self.nfree_conns] = cid
        self.nfree_conns += 1
        self.nconns -= 1
        if FF_DEBUG:
            self._check()

    def set_floor(self, int64_t floor_ns):
        """The shortest update interval of every connection while the gateway
        is loaded (0: none). Raising it for all clients alike stretches their
        frames evenly and makes each one fuller, where a saturated loop would
        let the backlog decide who waits."""
        self.floor_ns = max(floor_ns, 0)

    def set_interval(self, int32_t cid, int64_t interval_ns):
        self.conns[cid].interval = interval_ns

    def touch(self, int32_t cid):
        """The connection was just written to (a reply): its heartbeat clock restarts."""
        self.conns[cid].last_send = _clock(CLOCK_MONOTONIC)

    def pause(self, int32_t cid):
        """Its socket's write buffer passed the high-water mark: conflate from now."""
        cdef Conn* c = &self.conns[cid]
        if c.flags & F_ACTIVE and not c.flags & F_PAUSED:
            c.flags |= F_PAUSED
            c.paused_at = _clock(CLOCK_MONOTONIC)

    def resume(self, int32_t cid):
        """Its socket drained: send what it missed, conflated, at the next pump."""
        cdef Conn* c = &self.conns[cid]
        if c.flags & F_PAUSED:
            c.flags &= ~F_PAUSED
            self._schedule(cid, 0)

    def group_size(self, int32_t cid):
        """How many connections share this connection's subscription set."""
        g = self.conns[cid].group
        return self.groups[g].members if g >= 0 else 0

    def subscribe_ids(self, int32_t cid, ids):
        """Make `ids` (any iterable of instrument ids) this connection's subscription set."""
        arr = np.unique(np.asarray(list(ids), dtype=np.int32))
        key = arr.tobytes()
        self._leave_group(cid)
        if not len(arr):
            return
        g = self.group_keys.get(key)
        if g is None:
            g = self._new_group(arr)
            self.group_keys[key] = g
        self._join_group(cid, g)
        if FF_DEBUG:
            self._check()

    # -- groups

    cdef int32_t _alloc_group(self) except -1:
        cdef int32_t g
        cdef Py_ssize_t n
        if self.nfree_groups:
            self.nfree_groups -= 1
            return self.free_groups[self.nfree_groups]
        n = max(64, self.ngroups_cap * 2)
        self.groups = <Group*>_grow(self.groups, self.ngroups_cap * sizeof(Group),
                                    n * sizeof(Group), 0)
        self.free_groups = <int32_t*>_grow(self.free_groups, self.ngroups_cap * 4, n * 4, 0)
        for g in range(n - 1, self.ngroups_cap, -1):
            self.free_groups[self.nfree_groups] = g
            self.nfree_groups += 1
        g = <int32_t>self.ngroups_cap
        self.ngroups_cap = n
        return g

    cdef void _ensure_inst(self, Py_ssize_t n) except *:
        cdef Py_ssize_t cap = self.inst_cap
        if n <= cap:
            return
        n = max(n, cap * 2, 64)
        self.rev = <int32_t**>_grow(self.rev, cap * sizeof(void*), n * sizeof(void*), 0)
        self.rev_n = <int32_t*>_grow(self.rev_n, cap * 4, n * 4, 0)
        self.rev_cap = <int32_t*>_grow(self.rev_cap, cap * 4, n * 4, 0)
        self.wrev = <int32_t**>_grow(self.wrev, cap * sizeof(void*), n * sizeof(void*), 0)
        self.wrev_n = <int32_t*>_grow(self.wrev_n, cap * 4, n * 4, 0)
        self.wrev_cap = <int32_t*>_grow(self.wrev_cap, cap * 4, n * 4, 0)
        self.inst_cap = n

    cdef void _push_vec(self, int32_t** vec, int32_t* vn, int32_t* vcap, int32_t i,
                        int32_t x) except *:
        if vn[i] == vcap[i]:
            vcap[i] = max(4, vcap[i] * 2)
            vec[i] = <int32_t*>_grow(vec[i], vn[i] * 4, vcap[i] * 4, 0)
        vec[i][vn[i]] = x
        vn[i] += 1

    cdef void _drop_vec(self, int32_t** vec, int32_t* vn, int32_t i, int32_t x) noexcept:
        cdef int32_t k
        for k in range(vn[i]):
            if vec[i][k] == x:
                vn[i] -= 1
                vec[i][k] = vec[i][vn[i]]
                return

    def _new_group(self, ids):
        cdef int32_t g = self._alloc_group()
        cdef Group* G = &self.groups[g]
        cdef const int32_t[::1] mv = ids
        cdef Py_ssize_t k, n = mv.shape[0]
        self._ensure_inst(self.table.size)
        memset(G, 0, sizeof(Group))
        G.ids = <int32_t*>malloc(n * 4)
        memcpy(G.ids, &mv[0], n * 4)
        G.n = <int32_t>n
        G.head = -1
        G.cache_pump[0] = G.cache_pump[1] = 0
        for k in range(n):
            self._push_vec(self.rev, self.rev_n, self.rev_cap, G.ids[k], g)
        return g

    def _join_group(self, int32_t cid, int32_t g):
        cdef Conn* c = &self.conns[cid]
        cdef Group* G = &self.groups[g]
        c.group = g
        c.gprev = -1
        c.gnext = G.head
        if G.head >= 0:
            self.conns[G.head].gprev = cid
        G.head = cid
        G.members += 1

    cdef void _leave_group(self, int32_t cid) except *:
        cdef Conn* c = &self.conns[cid]
        cdef int32_t g = c.group
        cdef Group* G
        cdef int32_t k
        if g < 0:
            return
        G = &self.groups[g]
        if c.gprev >= 0:
            self.conns[c.gprev].gnext = c.gnext
        else:
            G.head = c.gnext
        if c.gnext >= 0:
            self.conns[c.gnext].gprev = c.gprev
        c.group = c.gnext = c.gprev = -1
        G.members -= 1
        if G.members == 0:
            for k in range(G.n):
                self._drop_vec(self.rev, self.rev_n, G.ids[k], g)
            key = PyBytes_FromStringAndSize(<char*>G.ids, G.n * 4)
            del self.group_keys[key]
            free(G.ids)
            G.ids = NULL
            G.n = 0
            self.free_groups[self.nfree_groups] = g
            self.nfree_groups += 1

    # -- watching

    def watch_ids(self, int32_t cid, ids, bint on):
        """Start (on) or stop watching instruments: their changes make `cid` due at once."""
        self._ensure_inst(self.table.size)
        for iid in ids:
            if on:
                self._push_vec(self.wrev, self.wrev_n, self.wrev_cap, iid, cid)
            else:
                self._drop_vec(self.wrev, self.wrev_n, iid, cid)
            self.table.watched[<int32_t>iid] = self.wrev_n[<int32_t>iid] > 0

    # -- scheduling

    cdef void _heap_push(self, int64_t due, int32_t cid) except *:
        cdef Py_ssize_t i, parent, n
        if self.heap_n == self.heap_cap:
            n = self.heap_cap * 2 if self.heap_cap else 64
            self.heap = <HeapItem*>_grow(self.heap, self.heap_cap * sizeof(HeapItem),
                                         n * sizeof(HeapItem), 0)
            self.heap_cap = n
        i = self.heap_n
        self.heap_n += 1
        while i > 0:
            parent = (i - 1) >> 1
            if self.heap[parent].due <= due:
                break
            self.heap[i] = self.heap[parent]
            i = parent
        self.heap[i].due = due
        self.heap[i].cid = cid

    cdef HeapItem _heap_pop(self) noexcept:
        cdef HeapItem top = self.heap[0]
        cdef HeapItem last
        cdef Py_ssize_t i = 0, child, n
        self.heap_n -= 1
        n = self.heap_n
        if n:
            last = self.heap[n]
            while True:
                child = 2 * i + 1
                if child >= n:
                    break
                if child + 1 < n and self.heap[child + 1].due < self.heap[child].due:
                    child += 1
                if self.heap[child].due >= last.due:
                    break
                self.heap[i] = self.heap[child]
                i = child
            self.heap[i] = last
        return top

    cdef void _schedule(self, int32_t cid, int64_t due) except *:
        # A connection sits in the heap once; an earlier deadline re-pushes it
        # and the stale entry is skipped when it surfaces.
        cdef Conn* c = &self.conns[cid]
        if c.flags & F_IN_HEAP and c.due <= due:
            return
        c.flags |= F_IN_HEAP
        c.due = due
        self._heap_push(due, cid)

    def pump(self, int64_t budget_ns=4_000_000, int64_t wall=0, int64_t mono=0):
        """Send every frame that is due. Returns True if the time slice ran out first.

        `wall` (ns since the epoch) is the frame's `t`; 0 reads the clock.
        `mono` (tests only) fixes the monotonic clock and lifts the time slice.
        """
        cdef Kind T = self.table
        cdef int64_t start = mono or _clock(CLOCK_MONOTONIC)
        cdef int64_t due
        cdef int64_t now = start
        cdef uint64_t word
        cdef Py_ssize_t w, k, nwords
        cdef int32_t iid, g, cid
        cdef Group* G
        cdef Conn* c
        cdef HeapItem item
        cdef int sent = 0
        cdef bint overrun = False
        if wall == 0:
            wall = _clock(CLOCK_REALTIME)
        self.pump_no += 1
        self.arena_len = 0
        T.stats.pumps += 1
        self._ensure_inst(T.size)
        if FF_DEBUG:
            T.check()
            self._check()
        # dirty instruments -> their groups -> member connections become due
        nwords = (T.size + 63) >> 6
        for w in range(nwords):
            word = T.dirty[w]
            if not word:
                continue
            T.dirty[w] = 0
            while word:
                iid = <int32_t>((w << 6) + __builtin_ctzll(word))
                word &= word - 1
                for k in range(self.rev_n[iid]):
                    g = self.rev[iid][k]
                    G = &self.groups[g]
                    if G.mark == self.pump_no:
                        continue
                    G.mark = self.pump_no
                    cid = G.head
                    while cid >= 0:
                        c = &self.conns[cid]
                        if c.flags & F_PAUSED:
                            T.stats.conflated += 1
                        else:
                            due = c.last_send + max(c.interval, self.floor_ns)
                            self._schedule(cid, due)
                        cid = c.gnext
        T.swept = T.version
        # watched instruments that changed make their watchers due now
        for k in range(T.nhot):
            iid = T.hot[k]
            T.hot_bits[iid >> 6] = 0
            for w in range(self.wrev_n[iid]):
                cid = self.wrev[iid][w]
                if not self.conns[cid].flags & F_PAUSED:
                    self._schedule(cid, 0)
                    T.stats.watched_pushes += 1
        T.nhot = 0
        while self.heap_n and self.heap[0].due <= now + self.slack:
            item = self._heap_pop()
            c = &self.conns[item.cid]
            if not c.flags & F_IN_HEAP or c.due != item.due:
                continue
            c.flags &= ~F_IN_HEAP
            if c.flags & F_PAUSED:
                T.stats.conflated += 1
                continue
            self._frame(item.cid, now, wall)
            sent += 1
            if sent & 15 == 0 and not mono:
                now = _clock(CLOCK_MONOTONIC)
                if now - start > budget_ns:
                    overrun = True
                    T.stats.overruns += 1
                    break
        if not mono:
            T.stats.build_ns += _clock(CLOCK_MONOTONIC) - start
        if FF_DEBUG:
            self._check()
        return overrun

    cdef int _frame(self, int32_t cid, int64_t now, int64_t wall) except -1:
        cdef Kind T = self.table
        cdef Conn* c = &self.conns[cid]
        cdef Group* G = &self.groups[c.group]
        cdef int b = 1 if c.flags & F_BINARY else 0
        cdef Py_ssize_t off, need
        cdef uint32_t count = 0
        cdef char* p
        cdef int64_t oldest = 0
        if c.group < 0:
            # nothing subscribed: nothing is pending either (as a frame with
            # no rows would say), so a later subscribe starts from now
            c.sent_ver = T.version
            return 0
        if G.cache_pump[b] == self.pump_no and G.cache_ver[b] == c.sent_ver:
            if G.cache_len[b]:
                self._send(cid, b, G.cache_off[b], G.cache_len[b])
                c.last_send = now
            c.sent_ver = T.version
            return 0
        # worst case: every item of the group plus the envelope
        need = HEADROOM + T.frame_bound(G.n, b)
        if self.arena_len + need > self.arena_cap:
            n2 = max(self.arena_cap * 2, self.arena_len + need, 65536)
            self.arena = <char*>_grow(self.arena, self.arena_cap, n2, 0)
            self.arena_cap = n2
        off = self.arena_len + HEADROOM
        p = T.encode_frame(self.arena + off, G.ids, G.n, c.sent_ver, b, wall, &count, &oldest)
        if FF_DEBUG and not self.arena + off <= p <= self.arena + off + need - HEADROOM:
            _overrun("frame", p - (self.arena + off), need - HEADROOM)
        G.cache_pump[b] = self.pump_no
        G.cache_ver[b] = c.sent_ver
        G.cache_off[b] = off
        if count == 0:
            G.cache_len[b] = 0
            c.sent_ver = T.version
            return 0
        G.cache_len[b] = p - (self.arena + off)
        self.arena_len = off + G.cache_len[b]
        T.stats.frames_built += 1
        self.lat_ring[self.lat_n & 255] = wall - oldest
        self.lat_n += 1
        self._send(cid, b, off, G.cache_len[b])
        c.sent_ver = T.version
        c.last_send = now
        return 0

    cdef int _send(self, int32_t cid, int binary, Py_ssize_t off, Py_ssize_t n) except -1:
        cdef WSTransport tr
        cdef object o = <object>PyList_GET_ITEM(self.transports, cid)
        self.table.stats.frames += 1
        self.table.stats.bytes_sent += n
        if self.capture is not None:
            self.capture.append((cid, PyBytes_FromStringAndSize(self.arena + off, n)))
            return 0
        tr = <WSTransport>o
        if not writable(tr):
            return 0
        tr.send_reuse_external_buffer(WSMsgType.BINARY if binary else WSMsgType.TEXT,
                                      self.arena + off, n)
        return 0

    def sweep(self, int64_t heartbeat_ns, int64_t stall_ns):
        """Once a second: heartbeats to quiet connections; returns ids stalled past the limit."""
        cdef int64_t now = _clock(CLOCK_MONOTONIC)
        cdef Py_ssize_t cid
        cdef Conn* c
        stalled = []
        hb = None
        for cid in range(len(self.transports)):
            c = &self.conns[cid]
            if not c.flags & F_ACTIVE:
                continue
            if c.flags & F_PAUSED:
                if now - c.paused_at > stall_ns:
                    stalled.append(cid)
                continue
            if now - c.last_send >= heartbeat_ns:
                if hb is None:
                    hb = b'{"type":"heartbeat","t":%d}' % _clock(CLOCK_REALTIME)
                self._send_bytes(cid, hb)
                c.last_send = now
                self.table.stats.heartbeats += 1
        return stalled

    def _send_bytes(self, int32_t cid, bytes data):
        if self.capture is not None:
            self.capture.append((cid, data))
            return
        tr = <WSTransport>self.transports[cid]
        if writable(tr):
            tr.send(WSMsgType.TEXT, data)

    def take_latencies(self):
        """Tick-arrival-to-send latencies (ns) sampled since the last call, one per built frame."""
        n = min(self.lat_n, 256)
        out = [self.lat_ring[k] for k in range(n)]
        self.lat_n = 0
        return out

    def paused_count(self):
        cdef Py_ssize_t cid, n = 0
        for cid in range(len(self.transports)):
            if self.conns[cid].flags & F_PAUSED:
                n += 1
        return n

    # -- invariants (a FASTFEED_DEBUG=1 build checks them as it runs)

    def _check_invariants(self):
        """Raise AssertionError if the hub or its kind is inconsistent (tests, debugging)."""
        self.table.check()
        self._check()

    cdef int _check(self) except -1:
        cdef Py_ssize_t i, k, members, live = 0, grouped = 0, active = 0
        cdef int32_t g, cid, prev
        cdef Group* G
        cdef bint held
        assert 0 <= self.arena_len <= self.arena_cap, "frame arena overrun"
        assert 0 <= self.heap_n <= self.heap_cap, "deadline heap overrun"
        for i in range(1, self.heap_n):
            assert self.heap[(i - 1) >> 1].due <= self.heap[i].due, (
                f"deadline heap out of order at {i}")
        for i in range(self.heap_n):
            assert 0 <= self.heap[i].cid < len(self.transports), (
                f"deadline heap holds unknown connection {self.heap[i].cid}")
        for g in range(<int32_t>self.ngroups_cap):
            G = &self.groups[g]
            if G.ids == NULL:
                continue
            live += 1
            members = 0
            prev = -1
            cid = G.head
            while cid >= 0:
                assert self.conns[cid].flags & F_ACTIVE, f"group {g} holds closed connection {cid}"
                assert self.conns[cid].group == g, f"connection {cid} listed in group {g}"
                assert self.conns[cid].gprev == prev, f"group {g} list broken at {cid}"
                members += 1
                prev = cid
                cid = self.conns[cid].gnext
            assert members == G.members, (
                f"group {g} counts {G.members} members but lists {members}")
            assert members > 0, f"group {g} kept with no members"
            grouped += members
            for k in range(G.n):
                assert 0 <= G.ids[k] < self.table.size, f"group {g} holds unknown item {G.ids[k]}"
                held = False
                for i in range(self.rev_n[G.ids[k]]):
                    held = held or self.rev[G.ids[k]][i] == g
                assert held, f"item {G.ids[k]} does not list its group {g}"
            for k in range(2):
                if G.cache_pump[k] == self.pump_no and G.cache_len[k]:
                    assert G.cache_off[k] + G.cache_len[k] <= self.arena_len, (
                        f"group {g} cached frame lies past the arena's end")
        assert live == len(self.group_keys), (
            f"{live} live groups but {len(self.group_keys)} group keys")
        for i in range(len(self.transports)):
            if self.conns[i].flags & F_ACTIVE:
                active += 1
                assert self.conns[i].sent_ver <= self.table.version, (
                    f"connection {i} sent past the table's version")
                if self.conns[i].group >= 0:
                    grouped -= 1
        assert active == self.nconns, f"{active} active connections, nconns says {self.nconns}"
        assert grouped == 0, "group member counts disagree with the connections"
        return 0
