# cython: language_level=3
"""Frame fan-out: connections, subscription groups, the deadline heap, sockets.

The per-frame hot path lives here: `Hub.pump` turns the dirty bits of every
kind (slot) into due connections (through the groups that hold each item),
pops them from a deadline heap, builds each distinct frame once (the envelope
here, each kind's section by the kind, from its cached encodings) and writes
it to every socket that shares it.

A connection's pending set is derived, not stored: per slot, the items of its
subscription group whose change stamp is newer than that kind's version at its
last frame (`sent_ver[slot]`). That is what makes conflation free (nothing
queues per client) and what lets connections of one group that were served
together share one frame.

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
    BIN_HEADER, CLOCK_MONOTONIC, CLOCK_REALTIME, FF_DEBUG, HEADROOM, __builtin_ctzll, _clock,
    _grow,
)
from fastfeed._table cimport Kind
from fastfeed._wire cimport _put_i64

import re

import numpy as np

cdef const char* UPDATE_PREFIX = b'{"type":"update","t":'
_KEY_OK = re.compile(r"[a-z][a-z0-9_]{0,15}\Z")
#: kinds one Hub fans out at most (`Hub.add_kind` refuses more)
HUB_KINDS = MAX_SLOTS


cdef int _overrun(str what, Py_ssize_t n, Py_ssize_t bound) except -1:
    # out of line, so the hot path it guards (in debug builds) stays free of Python
    raise AssertionError(f"{what} of {n} bytes overran its bound of {bound}")


cdef bint writable(WSTransport tr, object is_closing=None) noexcept:
    """False once the connection is lost or its close frame is sent.

    picows sets `is_disconnected` only when the loop delivers connection_lost,
    one loop pass after the socket failed; until then the transport under it
    says `is_closing()`, and every write to it is dropped with a warning.
    `is_closing`: that method, bound once per connection (`Hub.add`): the
    lookup cost about as much as the rest of a frame's Python work.
    """
    if tr.is_disconnected or tr.is_close_frame_sent:
        return False
    try:
        if is_closing is None:
            is_closing = tr.underlying_transport.is_closing
        return not is_closing()
    except BaseException:
        return False


cdef object _closing_of(object transport):
    # the socket transport's is_closing, bound (None without a transport: tests)
    if transport is None:
        return None
    return getattr(getattr(transport, "underlying_transport", None), "is_closing", None)


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

    def __cinit__(self, Kind table not None, int64_t slack_ns=1_000_000):
        self.table = table
        self.kinds = []
        self.nslots = 0
        self.key_of = {}
        # "rows" is key 0: always in a JSON update frame, possibly empty
        memcpy(self.keytxt[0], b',"rows":[', 9)
        self.keylen[0] = 9
        self.nkeys = 1
        self.transports = []
        self.closing = []
        self.capture = None
        self.nconns_cap = 0
        self.nfree_conns = 0
        self.nconns = 0
        self.ngroups_cap = 0
        self.nfree_groups = 0
        self.group_keys = {}
        self.heap_n = 0
        self.heap_cap = 0
        self.arena_len = 0
        self.arena_cap = 0
        self.pump_no = 0
        self.slack = slack_ns
        self.floor_ns = 0
        self.lat_ring = <int64_t*>malloc(256 * 8)
        self.lat_n = 0
        self.add_kind(table)

    def __init__(self, Kind table not None, int64_t slack_ns=1_000_000):
        pass

    def add_kind(self, Kind kind not None):
        """Fan out `kind` too; returns its slot (the constructor's table is slot 0).

        Its entries go in update frames under `kind.key`; kinds sharing a key
        share one array (a delayed quote table beside the live one: "rows").
        """
        cdef Py_ssize_t s = self.nslots
        cdef Py_ssize_t k, cid
        cdef int32_t ki = -1
        key = kind.key
        if s >= MAX_SLOTS:
            raise ValueError(f"a hub fans out at most {MAX_SLOTS} kinds")
        if kind in self.kinds:
            raise ValueError("this kind already has a slot")
        if not isinstance(key, str) or not _KEY_OK.match(key):
            raise ValueError(f"a kind's key is 1 to 16 of a-z 0-9 _, not {key!r}")
        txt = b',"%s":[' % key.encode()
        for k in range(self.nkeys):
            if self.keylen[k] == len(txt) and self.keytxt[k][:len(txt)] == txt:
                ki = <int32_t>k
        if ki < 0:
            ki = self.nkeys
            memcpy(self.keytxt[ki], <char*>txt, len(txt))
            self.keylen[ki] = <int32_t>len(txt)
            self.nkeys += 1
        self.kinds.append(kind)
        self.kptr[s] = <void*>kind
        self.keyof[s] = ki
        self.fmt_mask[0] |= 1u << s
        self.fmt_mask[3] |= 1u << s
        self.fmt_mask[1 if kind.has_binary else 2] |= 1u << s
        if kind.has_binary:
            self.fmt_mask[4] |= 1u << s
        for cid in range(len(self.transports)):
            self.conns[cid].sent_ver[s] = kind.version
        self.nslots += 1
        return s

    def __dealloc__(self):
        cdef Py_ssize_t i, s
        for i in range(self.ngroups_cap):
            free(self.groups[i].ids)
        for s in range(MAX_SLOTS):
            for i in range(self.inst_cap[s]):
                free(self.rev[s][i])
                free(self.wrev[s][i])
            free(self.rev[s])
            free(self.rev_n[s])
            free(self.rev_cap[s])
            free(self.wrev[s])
            free(self.wrev_n[s])
            free(self.wrev_cap[s])
        free(self.conns)
        free(self.free_conns)
        free(self.groups)
        free(self.free_groups)
        free(self.heap)
        free(self.arena)
        free(self.lat_ring)

    # -- connections

    def add(self, transport, int64_t interval_ns, bint binary=False, int64_t mono=0,
            bint compact=False):
        """Register a connection; returns its id. `transport` is a picows WSTransport.

        `compact`: its update frames carry quote rows in the compact form
        (only the fields changed since its previous frame; docs/protocol.md):
        as JSON, or with `binary` as FFC1 frames.

        `mono` (tests only) stands in for the monotonic clock.
        """
        cdef int32_t cid
        cdef Py_ssize_t s
        cdef Conn* c
        if self.nfree_conns:
            self.nfree_conns -= 1
            cid = self.free_conns[self.nfree_conns]
            self.transports[cid] = transport
            self.closing[cid] = _closing_of(transport)
        else:
            if <Py_ssize_t>len(self.transports) >= self.nconns_cap:
                n = max(64, self.nconns_cap * 2)
                self.conns = <Conn*>_grow(self.conns, self.nconns_cap * sizeof(Conn),
                                          n * sizeof(Conn), 0)
                self.free_conns = <int32_t*>_grow(self.free_conns, self.nconns_cap * 4, n * 4, 0)
                self.nconns_cap = n
            cid = <int32_t>len(self.transports)
            self.transports.append(transport)
            self.closing.append(_closing_of(transport))
        c = &self.conns[cid]
        memset(c, 0, sizeof(Conn))
        c.group = -1
        c.gnext = c.gprev = -1
        c.flags = F_ACTIVE | (F_BINARY if binary else 0) | (F_COMPACT if compact else 0)
        c.interval = interval_ns
        for s in range(self.nslots):
            c.sent_ver[s] = (<Kind>self.kptr[s]).version
        c.last_send = mono or _clock(CLOCK_MONOTONIC)
        self.nconns += 1
        return cid

    def remove(self, int32_t cid):
        """Forget a connection (after its socket closed). Idempotent."""
        cdef Conn* c = &self.conns[cid]
        if not c.flags & F_ACTIVE:
            return
        self._leave_group(cid)
        self._unwatch_all(cid)
        c.flags = 0
        self.transports[cid] = None
        self.closing[cid] = None
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

    def subscribe_ids(self, int32_t cid, ids, Py_ssize_t slot=0):
        """Make `ids` (any iterable of item ids of `slot`'s kind) this
        connection's subscription set in that slot; its other slots stay."""
        if not 0 <= slot < self.nslots:
            raise ValueError(f"no slot {slot}: this hub has {self.nslots}")
        arr = np.unique(np.asarray(list(ids), dtype=np.int64))
        if len(arr) and not (0 <= arr[0] and arr[-1] < 2**31 - 1):
            raise ValueError(f"item ids are 0 .. 2**31-2, not {arr[0] if arr[0] < 0 else arr[-1]}")
        parts = self._parts(self.conns[cid].group)
        if not len(parts[slot]):
            # nothing of this slot was pending: its pending starts now, the
            # moment of the snapshot the session sends, so changes made before
            # it (trades in particular) do not come again in the next frame
            self.conns[cid].sent_ver[slot] = (<Kind>self.kptr[slot]).version
        parts[slot] = arr.astype(np.int32)
        self._leave_group(cid)
        key = b"".join(b"%d:%d:" % (k, len(a)) + a.tobytes() for k, a in enumerate(parts)
                       if len(a))
        if not key:
            return
        g = self.group_keys.get(key)
        if g is None:
            g = self._new_group(parts)
            self.group_keys[key] = g
            self.key_of[g] = key
        self._join_group(cid, g)
        if FF_DEBUG:
            self._check()

    def _parts(self, int32_t g):
        """Per slot, the ids group `g` holds (empty arrays if g < 0)."""
        cdef Group* G
        cdef Py_ssize_t s
        if g < 0:
            return [np.zeros(0, dtype=np.int32) for _ in range(self.nslots)]
        G = &self.groups[g]
        return [np.frombuffer(PyBytes_FromStringAndSize(<char*>(G.ids + G.off[s]),
                                                        (G.off[s + 1] - G.off[s]) * 4),
                              dtype=np.int32) for s in range(self.nslots)]

    def sent_version(self, int32_t cid, Py_ssize_t slot):
        """The version of `slot`'s kind this connection's next frame starts
        after: a snapshot cut there (trades) repeats nothing that frame sends."""
        if not 0 <= slot < self.nslots:
            raise ValueError(f"no slot {slot}: this hub has {self.nslots}")
        return self.conns[cid].sent_ver[slot]

    def subscribed_ids(self, int32_t cid, Py_ssize_t slot=0):
        """The item ids of `slot` this connection is subscribed to (sorted)."""
        return [int(x) for x in self._parts(self.conns[cid].group)[slot]]

    def subscribers(self, Py_ssize_t slot, Py_ssize_t item):
        """Connections subscribed to `item` of `slot` (for a kind's rare events)."""
        cdef Py_ssize_t k
        cdef int32_t cid
        out = []
        if not 0 <= slot < self.nslots or not 0 <= item < self.inst_cap[slot]:
            return out
        for k in range(self.rev_n[slot][item]):
            cid = self.groups[self.rev[slot][item][k]].head
            while cid >= 0:
                out.append(cid)
                cid = self.conns[cid].gnext
        return out

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

    cdef void _ensure_inst(self, Py_ssize_t s, Py_ssize_t n) except *:
        cdef Py_ssize_t cap = self.inst_cap[s]
        if n <= cap:
            return
        n = max(n, cap * 2, 64)
        self.rev[s] = <int32_t**>_grow(self.rev[s], cap * sizeof(void*), n * sizeof(void*), 0)
        self.rev_n[s] = <int32_t*>_grow(self.rev_n[s], cap * 4, n * 4, 0)
        self.rev_cap[s] = <int32_t*>_grow(self.rev_cap[s], cap * 4, n * 4, 0)
        self.wrev[s] = <int32_t**>_grow(self.wrev[s], cap * sizeof(void*), n * sizeof(void*), 0)
        self.wrev_n[s] = <int32_t*>_grow(self.wrev_n[s], cap * 4, n * 4, 0)
        self.wrev_cap[s] = <int32_t*>_grow(self.wrev_cap[s], cap * 4, n * 4, 0)
        self.inst_cap[s] = n

    cdef void _push_vec(self, int32_t** vec, int32_t* vn, int32_t* vcap, int32_t i,
                        int32_t x) except *:
        if vn[i] == vcap[i]:
            vcap[i] = max(4, vcap[i] * 2)
            vec[i] = <int32_t*>_grow(vec[i], vn[i] * 4, vcap[i] * 4, 0)
        vec[i][vn[i]] = x
        vn[i] += 1

    cdef bint _drop_vec(self, int32_t** vec, int32_t* vn, int32_t i, int32_t x) noexcept:
        cdef int32_t k
        for k in range(vn[i]):
            if vec[i][k] == x:
                vn[i] -= 1
                vec[i][k] = vec[i][vn[i]]
                return True
        return False

    def _new_group(self, parts):
        cdef int32_t g = self._alloc_group()
        cdef Group* G = &self.groups[g]
        cdef const int32_t[::1] mv
        cdef Py_ssize_t k, s, n, total = sum(len(a) for a in parts)
        memset(G, 0, sizeof(Group))
        G.ids = <int32_t*>malloc(max(total, 1) * 4)
        if G.ids == NULL:
            raise MemoryError()
        G.head = -1
        n = 0
        for s in range(MAX_SLOTS):
            G.off[s] = <int32_t>n
            if s >= len(parts) or not len(parts[s]):
                continue
            mv = parts[s]
            # an id past the kind (a caller's bug the debug build reports)
            # must not run past the reverse index
            self._ensure_inst(s, max((<Kind>self.kptr[s]).size, mv[mv.shape[0] - 1] + 1))
            memcpy(G.ids + n, &mv[0], mv.shape[0] * 4)
            for k in range(mv.shape[0]):
                self._push_vec(self.rev[s], self.rev_n[s], self.rev_cap[s], mv[k], g)
            n += mv.shape[0]
            G.slots |= 1u << s
        G.off[MAX_SLOTS] = <int32_t>n
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
        cdef Py_ssize_t s
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
            for s in range(self.nslots):
                for k in range(G.off[s], G.off[s + 1]):
                    self._drop_vec(self.rev[s], self.rev_n[s], G.ids[k], g)
            del self.group_keys[self.key_of.pop(g)]
            free(G.ids)
            G.ids = NULL
            G.slots = 0
            self.free_groups[self.nfree_groups] = g
            self.nfree_groups += 1

    # -- watching

    def watch_ids(self, int32_t cid, ids, bint on, Py_ssize_t slot=0):
        """Start (on) or stop watching items of `slot`: their changes make `cid` due at once."""
        cdef Kind K
        cdef int32_t i
        if not 0 <= slot < self.nslots:
            raise ValueError(f"no slot {slot}: this hub has {self.nslots}")
        K = <Kind>self.kptr[slot]
        ids = list(ids)
        for iid in ids:
            if not 0 <= iid < K.size:
                raise ValueError(f"item {iid} is not in slot {slot} (its kind holds {K.size})")
        self._ensure_inst(slot, K.size)
        for iid in ids:
            i = iid
            if on:
                self._push_vec(self.wrev[slot], self.wrev_n[slot], self.wrev_cap[slot], i, cid)
                self.watches += 1
            elif self._drop_vec(self.wrev[slot], self.wrev_n[slot], i, cid):
                self.watches -= 1
            K.watched[i] = self.wrev_n[slot][i] > 0

    cdef void _unwatch_all(self, int32_t cid) noexcept:
        # a closed connection's id is reused by the next one: no watch of the
        # old one may make it due. Rare (once per close), so a scan of the
        # watched items beats keeping a watch list per connection.
        cdef Py_ssize_t s, i
        cdef Kind K
        for s in range(self.nslots):
            K = <Kind>self.kptr[s]
            for i in range(min(K.size, self.inst_cap[s])):
                if self.wrev_n[s][i] and self._drop_vec(self.wrev[s], self.wrev_n[s],
                                                        <int32_t>i, cid):
                    self.watches -= 1
                    K.watched[i] = self.wrev_n[s][i] > 0

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

    cdef void _sweep(self, Py_ssize_t s) except *:
        # dirty items of slot s -> their groups -> member connections become due;
        # watched items that changed make their watchers due now
        cdef Kind T = <Kind>self.kptr[s]
        cdef Kind S = self.table
        cdef int64_t due
        cdef uint64_t word
        cdef Py_ssize_t w, k, nwords
        cdef int32_t iid, g, cid
        cdef int32_t** rev
        cdef int32_t* rev_n
        cdef Group* G
        cdef Conn* c
        self._ensure_inst(s, T.size)
        rev = self.rev[s]
        rev_n = self.rev_n[s]
        nwords = (T.size + 63) >> 6
        for w in range(nwords):
            word = T.dirty[w]
            if not word:
                continue
            T.dirty[w] = 0
            while word:
                iid = <int32_t>((w << 6) + __builtin_ctzll(word))
                word &= word - 1
                for k in range(rev_n[iid]):
                    g = rev[iid][k]
                    G = &self.groups[g]
                    if G.mark == self.pump_no:
                        continue
                    G.mark = self.pump_no
                    cid = G.head
                    while cid >= 0:
                        c = &self.conns[cid]
                        if c.flags & F_PAUSED:
                            S.stats.conflated += 1
                        else:
                            due = c.last_send + max(c.interval, self.floor_ns)
                            self._schedule(cid, due)
                        cid = c.gnext
        T.swept = T.version
        for k in range(T.nhot):
            iid = T.hot[k]
            T.hot_bits[iid >> 6] = 0
            for w in range(self.wrev_n[s][iid]):
                cid = self.wrev[s][iid][w]
                if not self.conns[cid].flags & F_PAUSED:
                    self._schedule(cid, 0)
                    S.stats.watched_pushes += 1
        T.nhot = 0

    def pump(self, int64_t budget_ns=4_000_000, int64_t wall=0, int64_t mono=0):
        """Send every frame that is due. Returns True if the time slice ran out first
        (`stats` counts an overrun once per OVERRUN_NS of a cycle's work so ended).

        `wall` (ns since the epoch) is the frame's `t`; 0 reads the clock.
        `mono` (tests only) fixes the monotonic clock and lifts the time slice.
        """
        cdef Kind T = self.table
        cdef int64_t start = mono or _clock(CLOCK_MONOTONIC)
        cdef int64_t now = start
        cdef Py_ssize_t s
        cdef Conn* c
        cdef HeapItem item
        cdef int sent = 0
        cdef bint overrun = False
        if wall == 0:
            wall = _clock(CLOCK_REALTIME)
        self.pump_no += 1
        self.arena_len = 0
        T.stats.pumps += 1
        if FF_DEBUG:
            for s in range(self.nslots):
                (<Kind>self.kptr[s]).check()
            self._check()
        for s in range(self.nslots):
            self._sweep(s)
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
                    break
        if not mono:
            now = _clock(CLOCK_MONOTONIC)
            T.stats.build_ns += now - start
            # an overrun is a cycle with more than OVERRUN_NS of work left
            # after a slice, however short the slices it yields in
            if overrun:
                self.cycle_ns += now - start
                if self.cycle_ns > OVERRUN_NS:
                    T.stats.overruns += 1
                    self.cycle_ns = 0
            else:
                self.cycle_ns = 0
        if FF_DEBUG:
            self._check()
        return overrun

    cdef int _frame(self, int32_t cid, int64_t now, int64_t wall) except -1:
        cdef Conn* c = &self.conns[cid]
        cdef Group* G
        cdef Py_ssize_t s
        cdef int sent = 0
        if c.group >= 0:
            G = &self.groups[c.group]
            if not c.flags & F_BINARY:
                sent = self._serve(cid, G, c, 3 if c.flags & F_COMPACT else 0, wall)
            else:
                # quote rows as FFB1 (or FFC1), the other kinds in a JSON frame beside it
                if G.slots & self.fmt_mask[1]:
                    sent = self._serve(cid, G, c, 4 if c.flags & F_COMPACT else 1, wall)
                if G.slots & self.fmt_mask[2]:
                    sent += self._serve(cid, G, c, 2, wall)
        # with nothing subscribed nothing is pending either (as a frame with
        # no items would say), so a later subscribe starts from now
        for s in range(self.nslots):
            c.sent_ver[s] = (<Kind>self.kptr[s]).version
        if sent:
            c.last_send = now
        return 0

    cdef int _serve(self, int32_t cid, Group* G, Conn* c, int fmt, int64_t wall) except -1:
        """Send `c` the group's frame of format `fmt`, built once per state
        (the vector of its slots' sent_ver) per pump; returns 1 if it sent one."""
        cdef Py_ssize_t s
        cdef bint hit = G.cache_pump[fmt] == self.pump_no
        if hit:
            for s in range(self.nslots):
                if G.slots >> s & 1 and G.cache_ver[fmt * MAX_SLOTS + s] != c.sent_ver[s]:
                    hit = False
                    break
        if not hit:
            self._build(G, c, fmt, wall)
        if G.cache_len[fmt]:
            self._send(cid, fmt == 1 or fmt == 4, G.cache_off[fmt], G.cache_len[fmt])
            return 1
        return 0

    cdef int _build(self, Group* G, Conn* c, int fmt, int64_t wall) except -1:
        cdef Kind K
        cdef Py_ssize_t s, need, off
        cdef int32_t ki, n
        cdef uint32_t cnt = 0, kcnt, total = 0
        cdef uint32_t mask = G.slots & self.fmt_mask[fmt]
        cdef int64_t old = 0, oldest = 0
        cdef char* p
        cdef char* q
        cdef char* keyp
        cdef char* start
        # worst case: every item of the group plus the envelope and the keys
        need = HEADROOM + 64 + self.nkeys * (KEY_MAX + 1)
        for s in range(self.nslots):
            if mask >> s & 1:
                K = <Kind>self.kptr[s]
                n = G.off[s + 1] - G.off[s]
                if fmt == 1 or fmt == 4:
                    need += K.bin_bound(n, fmt == 4)
                elif fmt == 3:
                    need += K.compact_bound(n) + 1
                else:
                    need += K.section_bound(n) + 1
        if self.arena_len + need > self.arena_cap:
            n2 = max(self.arena_cap * 2, self.arena_len + need, 65536)
            self.arena = <char*>_grow(self.arena, self.arena_cap, n2, 0)
            self.arena_cap = n2
        off = self.arena_len + HEADROOM
        start = p = self.arena + off
        if fmt == 1 or fmt == 4:
            memcpy(p, b"FFC1" if fmt == 4 else b"FFB1", 4)
            memcpy(p + 8, &wall, 8)
            p += BIN_HEADER
            for s in range(self.nslots):
                if mask >> s & 1:
                    K = <Kind>self.kptr[s]
                    p = K.encode_bin(p, G.ids + G.off[s], G.off[s + 1] - G.off[s],
                                     c.sent_ver[s], fmt == 4, wall, &cnt, &old)
                    if cnt:
                        if total == 0 or old < oldest:
                            oldest = old
                        total += cnt
            memcpy(start + 4, &total, 4)
        else:
            memcpy(p, UPDATE_PREFIX, 21)
            p = _put_i64(p + 21, wall)
            for ki in range(self.nkeys):
                keyp = p
                memcpy(p, self.keytxt[ki], self.keylen[ki])
                p += self.keylen[ki]
                kcnt = 0
                for s in range(self.nslots):
                    if self.keyof[s] != ki or not mask >> s & 1:
                        continue
                    K = <Kind>self.kptr[s]
                    q = p
                    if kcnt:
                        q[0] = b","
                        q += 1
                    if fmt == 3:
                        q = K.encode_compact(q, G.ids + G.off[s], G.off[s + 1] - G.off[s],
                                             c.sent_ver[s], wall, &cnt, &old)
                    else:
                        q = K.encode_section(q, G.ids + G.off[s], G.off[s + 1] - G.off[s],
                                             c.sent_ver[s], &cnt, &old)
                    if cnt:
                        p = q
                        if total + kcnt == 0 or old < oldest:
                            oldest = old
                        kcnt += cnt
                if kcnt or ki == 0:
                    p[0] = b"]"
                    p += 1
                else:
                    p = keyp  # only `rows` is there when empty
                total += kcnt
            p[0] = b"}"
            p += 1
        if FF_DEBUG and not start <= p <= start + need - HEADROOM:
            _overrun("frame", p - start, need - HEADROOM)
        G.cache_pump[fmt] = self.pump_no
        for s in range(self.nslots):
            G.cache_ver[fmt * MAX_SLOTS + s] = c.sent_ver[s]
        G.cache_off[fmt] = off
        if total == 0:
            G.cache_len[fmt] = 0
            return 0
        G.cache_len[fmt] = p - start
        self.arena_len = off + G.cache_len[fmt]
        self.table.stats.frames_built += 1
        self.lat_ring[self.lat_n & 255] = wall - oldest
        self.lat_n += 1
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
        if not writable(tr, <object>PyList_GET_ITEM(self.closing, cid)):
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
        if writable(tr, self.closing[cid]):
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
        """Raise AssertionError if the hub or its kinds are inconsistent (tests, debugging)."""
        cdef Py_ssize_t s
        for s in range(self.nslots):
            (<Kind>self.kptr[s]).check()
        self._check()

    cdef int _check(self) except -1:
        cdef Py_ssize_t i, k, s, members, live = 0, grouped = 0, active = 0
        cdef int32_t g, cid, prev, iid
        cdef Group* G
        cdef Kind K
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
            assert G.off[0] == 0 and G.off[self.nslots] == G.off[MAX_SLOTS], (
                f"group {g} holds ids past its slots")
            for s in range(self.nslots):
                K = <Kind>self.kptr[s]
                assert G.off[s] <= G.off[s + 1], f"group {g} slot offsets out of order"
                assert (G.slots >> s & 1) == (G.off[s + 1] > G.off[s]), (
                    f"group {g} slot mask disagrees with its ids in slot {s}")
                where = "" if s == 0 else f" of slot {s}"
                for k in range(G.off[s], G.off[s + 1]):
                    iid = G.ids[k]
                    assert 0 <= iid < K.size, f"group {g} holds unknown item {iid}{where}"
                    assert k == G.off[s] or G.ids[k - 1] < iid, (
                        f"group {g} ids of slot {s} not sorted and unique")
                    held = False
                    for i in range(self.rev_n[s][iid]):
                        held = held or self.rev[s][iid][i] == g
                    assert held, f"item {iid}{where} does not list its group {g}"
            for k in range(NFMT):
                if G.cache_pump[k] == self.pump_no and G.cache_len[k]:
                    assert G.cache_off[k] + G.cache_len[k] <= self.arena_len, (
                        f"group {g} cached frame lies past the arena's end")
        assert live == len(self.group_keys) == len(self.key_of), (
            f"{live} live groups but {len(self.group_keys)} group keys")
        watches = 0
        for s in range(self.nslots):
            K = <Kind>self.kptr[s]
            for i in range(min(K.size, self.inst_cap[s])):
                watches += self.wrev_n[s][i]
                assert K.watched[i] == (self.wrev_n[s][i] > 0), (
                    f"item {i} of slot {s}: watched flag disagrees with its watchers")
                for k in range(self.wrev_n[s][i]):
                    assert self.conns[self.wrev[s][i][k]].flags & F_ACTIVE, (
                        f"item {i} of slot {s} watched by closed connection")
        for i in range(len(self.transports)):
            if self.conns[i].flags & F_ACTIVE:
                active += 1
                for s in range(self.nslots):
                    assert self.conns[i].sent_ver[s] <= (<Kind>self.kptr[s]).version, (
                        f"connection {i} sent past the version of slot {s}")
                if self.conns[i].group >= 0:
                    grouped -= 1
        assert watches == self.watches, f"{watches} watch entries, watches says {self.watches}"
        assert active == self.nconns, f"{active} active connections, nconns says {self.nconns}"
        assert grouped == 0, "group member counts disagree with the connections"
        return 0
