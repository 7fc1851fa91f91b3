# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, infer_types=True
"""Compiled core of the bench load client and tick generator.

Everything that runs per frame or per row is C: the client listener is a
picows `WSListener` subclass whose `on_ws_frame` is reached through picows'
C-level API (no Python call per frame), the update parser walks the payload
bytes in place, and latencies go into log-bucket histograms held in C arrays
(`bench/hist.py` holds the Python mirror of the bucket layout).

Symbols of the bench universe are `S` followed by digits (`S0000`..): the
parser turns them into instrument indexes without a dict lookup.
"""

from libc.stdint cimport int64_t, uint64_t, uint32_t, uint8_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset, memcpy
from libc.stdio cimport snprintf
from posix.time cimport clock_gettime, timespec, CLOCK_REALTIME

from picows.picows cimport WSListener, WSTransport, WSFrame, WSMsgType

cdef extern from *:
    int __builtin_clzll(unsigned long long) nogil


cdef enum:
    # Histogram of latencies in microseconds: exact below 64 us, then 32
    # sub-buckets per power of two (about 3 % wide).
    SUB_BITS = 5
    SUB = 32
    LINEAR = 64
    NBUCKETS = 64 + 58 * 32
    F_SUB = 1
    F_WATCH = 2

NUM_BUCKETS = NBUCKETS


cdef inline int64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline int bucket_of(int64_t lat_ns) noexcept nogil:
    cdef uint64_t v
    cdef int e
    if lat_ns <= 0:
        return 0
    v = <uint64_t>(lat_ns // 1000)
    if v < LINEAR:
        return <int>v
    e = 63 - __builtin_clzll(v)            # 6 .. 63
    return LINEAR + (e - 6) * SUB + <int>((v >> (e - SUB_BITS)) - SUB)


cdef class Stats:
    """Counters and histograms shared by every client of one process."""

    cdef:
        int64_t hist[NBUCKETS]
        int64_t whist[NBUCKETS]
        public int64_t updates, frames, bytes, watched_updates
        public int64_t snapshots, snapshot_rows, unexpected_rows, stale_rows
        public int64_t errors, other_msgs, bad_frames
        public int64_t connected, disconnected, closed_by_server
        public int64_t marker_idx, marker_seq, marker_seen_ns
        public int64_t max_lat_ns
        public dict close_codes

    def __cinit__(self):
        self.reset()
        self.marker_idx = -1
        self.marker_seq = 0
        self.marker_seen_ns = 0
        self.connected = 0
        self.disconnected = 0
        self.closed_by_server = 0
        self.snapshots = 0
        self.close_codes = {}

    cpdef reset(self):
        """Clear the window counters (not the connection counters)."""
        memset(self.hist, 0, sizeof(self.hist))
        memset(self.whist, 0, sizeof(self.whist))
        self.updates = 0
        self.frames = 0
        self.bytes = 0
        self.watched_updates = 0
        self.snapshot_rows = 0
        self.unexpected_rows = 0
        self.stale_rows = 0
        self.errors = 0
        self.other_msgs = 0
        self.bad_frames = 0
        self.max_lat_ns = 0

    def histogram(self, bint watched=False):
        """Non-empty buckets as {index: count}."""
        cdef int i
        cdef int64_t* h
        if watched:
            h = &self.whist[0]
        else:
            h = &self.hist[0]
        return {i: h[i] for i in range(NBUCKETS) if h[i]}


cdef class Client(WSListener):
    """One load-client connection: subscribes, parses frames, keeps seqs."""

    cdef:
        Stats stats
        WSTransport transport
        int n_instr
        int64_t* seqs
        uint8_t* flags
        list hello
        public bint got_snapshot
        public bint closed
        public int close_code
        public object on_snapshot

    def __cinit__(self, Stats stats, int n_instr, list subscribe, list watch, list hello):
        cdef int i
        self.stats = stats
        self.n_instr = n_instr
        self.seqs = <int64_t*>calloc(n_instr, sizeof(int64_t))
        self.flags = <uint8_t*>calloc(n_instr, 1)
        if self.seqs == NULL or self.flags == NULL:
            raise MemoryError()
        for i in subscribe:
            self.flags[i] |= F_SUB
        for i in watch:
            self.flags[i] |= F_WATCH
        self.hello = hello
        self.got_snapshot = not subscribe
        self.closed = False
        self.close_code = 0
        self.on_snapshot = None

    def __dealloc__(self):
        free(self.seqs)
        free(self.flags)

    cpdef on_ws_connected(self, WSTransport transport):
        self.transport = transport
        self.stats.connected += 1
        for msg in self.hello:
            transport.send(WSMsgType.TEXT, msg)

    cpdef on_ws_disconnected(self, WSTransport transport):
        if not self.closed:
            self.closed = True
            self.stats.disconnected += 1

    cpdef on_ws_frame(self, WSTransport transport, WSFrame frame):
        cdef int64_t t = now_ns()
        if frame.msg_type == WSMsgType.TEXT or frame.msg_type == WSMsgType.BINARY:
            if frame.fin == 0:
                self.stats.bad_frames += 1
                return
            self.stats.frames += 1
            self.stats.bytes += frame.payload_size
            self._message(frame.payload_ptr, frame.payload_size, t)
        elif frame.msg_type == WSMsgType.CLOSE:
            self.close_code = frame.get_close_code()
            self.stats.closed_by_server += 1
            code = self.stats.close_codes.get(self.close_code, 0)
            self.stats.close_codes[self.close_code] = code + 1
            transport.send_close(frame.get_close_code())
            transport.disconnect()
        elif frame.msg_type == WSMsgType.CONTINUATION:
            self.stats.bad_frames += 1

    cpdef pause_writing(self):
        pass

    cpdef resume_writing(self):
        pass

    def close(self):
        if self.transport is not None and not self.closed:
            self.transport.send_close()
            self.transport.disconnect()

    def converged(self, const int64_t[:] final):
        """True when every subscribed instrument is at the publisher's last seq."""
        cdef int i
        if self.closed or not self.got_snapshot:
            return False
        for i in range(self.n_instr):
            if (self.flags[i] & F_SUB) and self.seqs[i] < final[i]:
                return False
        return True

    def behind(self, const int64_t[:] final):
        """How many subscribed instruments are short of the publisher's last seq."""
        cdef int i, n = 0
        for i in range(self.n_instr):
            if (self.flags[i] & F_SUB) and self.seqs[i] < final[i]:
                n += 1
        return n

    cdef int _message(self, char* p, Py_ssize_t n, int64_t t) except -1:
        cdef char* end = p + n
        cdef char* q
        cdef char c
        q = _find(p, end, b'"type"', 6)
        if q == NULL:
            self.stats.other_msgs += 1
            return 0
        q += 6
        while q < end and (q[0] == b':' or q[0] == b' ' or q[0] == b'"'):
            q += 1
        if q + 1 >= end:
            self.stats.other_msgs += 1
            return 0
        c = q[0]
        if c == b'u':                                   # update
            self._rows(q, end, t, True)
        elif c == b's' and q[1] == b'n':               # snapshot
            self.stats.snapshots += 1
            self._rows(q, end, t, False)
            self.got_snapshot = True
            if self.on_snapshot is not None:
                self.on_snapshot(self)
        elif c == b'e':                                 # error
            self.stats.errors += 1
        else:                                           # ack, pong, heartbeat, status
            self.stats.other_msgs += 1
        return 0

    cdef int _rows(self, char* p, char* end, int64_t t, bint live) except -1:
        cdef char* q = _find(p, end, b'"rows"', 6)
        cdef int64_t idx, seq, ts, lat
        cdef Stats st = self.stats
        cdef uint8_t fl
        cdef int b
        if q == NULL:
            return 0
        q += 6
        while q < end and q[0] != b'[':
            q += 1
        q += 1
        while True:
            while q < end and (q[0] == b' ' or q[0] == b',' or q[0] == b'\n'):
                q += 1
            if q >= end or q[0] != b'[':
                return 0
            q += 1
            while q < end and q[0] == b' ':
                q += 1
            if q >= end or q[0] != b'"':
                return 0
            q += 1
            # symbol: S + digits
            idx = -1
            if q < end and q[0] == b'S':
                q += 1
                idx = 0
                while q < end and b'0' <= q[0] <= b'9':
                    idx = idx * 10 + (q[0] - 48)
                    q += 1
                if q >= end or q[0] != b'"':
                    idx = -1
            while q < end and q[0] != b'"':
                q += 1
            q += 1
            q = _skip_sep(q, end)
            q = _int(q, end, &seq)
            q = _skip_sep(q, end)
            q = _int(q, end, &ts)
            while q < end and q[0] != b']':
                q += 1
            q += 1
            if idx < 0 or idx >= self.n_instr:
                st.unexpected_rows += 1
                continue
            fl = self.flags[idx]
            if not (fl & F_SUB):
                st.unexpected_rows += 1
                continue
            if seq > self.seqs[idx]:
                self.seqs[idx] = seq
            elif live:
                st.stale_rows += 1
            if not live:
                st.snapshot_rows += 1
                continue
            st.updates += 1
            lat = t - ts
            if lat > st.max_lat_ns:
                st.max_lat_ns = lat
            b = bucket_of(lat)
            st.hist[b] += 1
            if fl & F_WATCH:
                st.whist[b] += 1
                st.watched_updates += 1
            if idx == st.marker_idx and seq >= st.marker_seq and st.marker_seen_ns == 0:
                st.marker_seen_ns = t


cdef inline char* _find(char* p, char* end, const char* needle, int k) noexcept:
    cdef char* last = end - k
    cdef int j
    while p <= last:
        if p[0] == needle[0]:
            j = 1
            while j < k and p[j] == needle[j]:
                j += 1
            if j == k:
                return p
        p += 1
    return NULL


cdef inline char* _skip_sep(char* q, char* end) noexcept:
    while q < end and (q[0] == b',' or q[0] == b' '):
        q += 1
    return q


cdef inline char* _int(char* q, char* end, int64_t* out) noexcept:
    """Parse a JSON number as an integer (a fraction or exponent is honoured
    roughly, for peers whose numbers are doubles)."""
    cdef int64_t v = 0
    cdef bint neg = False
    cdef double d
    cdef int ex = 0, es = 1
    if q < end and q[0] == b'-':
        neg = True
        q += 1
    while q < end and b'0' <= q[0] <= b'9':
        v = v * 10 + (q[0] - 48)
        q += 1
    if q < end and q[0] == b'.':
        q += 1
        while q < end and b'0' <= q[0] <= b'9':
            q += 1
    if q < end and (q[0] == b'e' or q[0] == b'E'):
        q += 1
        if q < end and (q[0] == b'+' or q[0] == b'-'):
            es = -1 if q[0] == b'-' else 1
            q += 1
        while q < end and b'0' <= q[0] <= b'9':
            ex = ex * 10 + (q[0] - 48)
            q += 1
        d = <double>v
        while ex > 0:
            d = d * 10.0 if es > 0 else d / 10.0
            ex -= 1
        v = <int64_t>d
    out[0] = -v if neg else v
    return q


cdef class TickGen:
    """Skewed tick source: Zipf-like activity over a shuffled universe,
    strictly increasing seq per instrument, random-walk prices, JSON batches
    built with snprintf into one reusable buffer."""

    cdef:
        int n
        int64_t* seq
        double* px
        int64_t* vol
        uint32_t* table
        uint64_t rng
        char* buf
        Py_ssize_t cap
        public int64_t ticks

    def __cinit__(self, int n_instr, list table, uint64_t seed=12345):
        cdef int i
        self.n = n_instr
        self.seq = <int64_t*>calloc(n_instr, sizeof(int64_t))
        self.px = <double*>calloc(n_instr, sizeof(double))
        self.vol = <int64_t*>calloc(n_instr, sizeof(int64_t))
        self.table = <uint32_t*>calloc(65536, sizeof(uint32_t))
        self.cap = 1 << 20
        self.buf = <char*>calloc(self.cap, 1)
        if not (self.seq and self.px and self.vol and self.table and self.buf):
            raise MemoryError()
        if len(table) != 65536:
            raise ValueError("table must hold 65536 instrument indexes")
        for i in range(65536):
            self.table[i] = table[i]
        self.rng = seed * 6364136223846793005ULL + 1442695040888963407ULL
        if self.rng == 0:
            self.rng = 88172645463325252ULL
        for i in range(n_instr):
            self.px[i] = 100.0 + (i % 97)
        self.ticks = 0

    def __dealloc__(self):
        free(self.seq)
        free(self.px)
        free(self.vol)
        free(self.table)
        free(self.buf)

    cdef inline uint64_t _next(self) noexcept:
        # xorshift64*
        cdef uint64_t x = self.rng
        x ^= x >> 12
        x ^= x << 25
        x ^= x >> 27
        self.rng = x
        return x * 2685821657736338717ULL

    cdef Py_ssize_t _tick(self, Py_ssize_t off, int i, int64_t ts) noexcept:
        cdef uint64_t r = self._next()
        cdef double step = ((<double>(r & 0xFFFF)) / 65535.0 - 0.5) * 0.02
        cdef double p
        cdef int sz = <int>((r >> 16) % 500) + 1
        self.seq[i] += 1
        p = self.px[i] + step
        if p < 1.0:
            p = 1.0
        self.px[i] = p
        self.vol[i] += sz
        return off + snprintf(
            self.buf + off, self.cap - off,
            b'{"sym":"S%04d","seq":%lld,"ts":%lld,"bid":%.2f,"ask":%.2f,"last":%.2f,'
            b'"last_size":%d,"volume":%lld},',
            i, <long long>self.seq[i], <long long>ts, p - 0.01, p + 0.01, p, sz,
            <long long>self.vol[i])

    def batch(self, int count, int64_t ts):
        """A JSON array of `count` ticks stamped `ts` (bytes)."""
        cdef Py_ssize_t off = 1
        cdef int k, i
        if count <= 0:
            return b"[]"
        if <Py_ssize_t>count * 200 + 16 > self.cap:
            raise ValueError("batch too large")
        self.buf[0] = b'['
        for k in range(count):
            i = <int>self.table[self._next() >> 48]
            off = self._tick(off, i, ts)
        self.buf[off - 1] = b']'
        self.ticks += count
        return self.buf[:off]

    def seed_all(self, int64_t ts):
        """One tick for every instrument (so each has a row before clients subscribe)."""
        cdef Py_ssize_t off = 1
        cdef int i
        out = []
        self.buf[0] = b'['
        for i in range(self.n):
            off = self._tick(off, i, ts)
            if off > self.cap - 400 or i == self.n - 1:
                self.buf[off - 1] = b']'
                out.append(self.buf[:off])
                off = 1
        self.ticks += self.n
        return out

    def one(self, int i, int64_t ts):
        """A one-tick array for instrument `i` (used as an ingest marker)."""
        cdef Py_ssize_t off = 1
        self.buf[0] = b'['
        off = self._tick(off, i, ts)
        self.buf[off - 1] = b']'
        self.ticks += 1
        return self.buf[:off]

    def final_seqs(self):
        cdef int i
        return [self.seq[i] for i in range(self.n)]


def bucket_index(int64_t lat_ns):
    """Python access to the bucket function (tests compare it with hist.py)."""
    return bucket_of(lat_ns)
