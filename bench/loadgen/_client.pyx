# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, infer_types=True
"""Compiled core of the bench load client and tick generator.

Everything that runs per read, frame or row is C: an epoll loop reads each
ready socket with one `recv`, WebSocket frames are parsed in the connection's
own buffer, the update parser walks the payload in place (JSON text, or the
`fastfeed.v1.bin` records), and latencies go into log-bucket histograms held
in C arrays (`bench/hist.py` holds the Python mirror of the bucket layout).
An earlier version read through uvloop and picows: about 15 us per read,
which made the load client, not the servers, the limit.

Symbols of the bench universe are `S` followed by digits (`S0000`..): the
parser turns them into instrument indexes without a dict lookup.
"""

from libc.stdint cimport int64_t, uint64_t, uint32_t, uint8_t
from libc.errno cimport errno, EAGAIN, EINTR
from libc.stdlib cimport calloc, malloc, realloc, free
from libc.string cimport memset, memcpy, memmove, memcmp
from libc.stdio cimport snprintf
from posix.time cimport clock_gettime, timespec, CLOCK_REALTIME
from posix.unistd cimport close

cdef extern from "<sys/socket.h>" nogil:
    ssize_t recv(int fd, void* buf, size_t n, int flags)
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    enum:
        MSG_DONTWAIT
        MSG_NOSIGNAL

cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void* ptr
        int fd
        uint32_t u32
        uint64_t u64
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    enum:
        EPOLLIN
        EPOLL_CTL_ADD
        EPOLL_CTL_DEL
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event* event)
    int epoll_wait(int epfd, epoll_event* events, int maxevents, int timeout)

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
        public int64_t errors, other_msgs, bad_frames, reads
        public int64_t connected, disconnected, closed_by_server
        public int64_t max_lat_ns
        public dict close_codes

    def __cinit__(self):
        self.reset()
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
        self.reads = 0
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


cdef class Conn:
    """One load-client connection on a raw non-blocking socket.

    The handshake is done in Python (`worker.py`); from then on the `Loop`
    reads the socket with one `recv` per readiness event and this class
    parses the WebSocket frames in place: no Python call per frame.
    """

    cdef:
        Stats stats
        public int fd
        int n_instr
        int64_t* seqs
        uint8_t* flags
        char* buf
        Py_ssize_t cap, used
        public bint got_snapshot
        public bint closed
        public int close_code

    def __cinit__(self, Stats stats, int fd, int n_instr, list subscribe, list watch,
                  Py_ssize_t read_buffer=65536):
        cdef int i
        self.stats = stats
        self.fd = fd
        self.n_instr = n_instr
        self.seqs = <int64_t*>calloc(n_instr, sizeof(int64_t))
        self.flags = <uint8_t*>calloc(n_instr, 1)
        self.cap = max(read_buffer, 1024)
        self.buf = <char*>malloc(self.cap)
        self.used = 0
        if self.seqs == NULL or self.flags == NULL or self.buf == NULL:
            raise MemoryError()
        for i in subscribe:
            self.flags[i] |= F_SUB
        for i in watch:
            self.flags[i] |= F_WATCH
        self.got_snapshot = not subscribe
        self.closed = False
        self.close_code = 0
        stats.connected += 1

    def __dealloc__(self):
        free(self.seqs)
        free(self.flags)
        free(self.buf)

    def feed(self, const unsigned char[:] data):
        """Bytes that arrived with the handshake response."""
        if data.shape[0]:
            self._grow(data.shape[0])
            memcpy(self.buf + self.used, &data[0], data.shape[0])
            self.used += data.shape[0]
            self._frames(now_ns())

    cdef int _grow(self, Py_ssize_t extra) except -1:
        cdef char* nb
        if self.used + extra <= self.cap:
            return 0
        while self.used + extra > self.cap:
            self.cap *= 2
        nb = <char*>realloc(self.buf, self.cap)
        if nb == NULL:
            raise MemoryError()
        self.buf = nb
        return 0

    cdef int readable(self) except -1:
        cdef ssize_t n
        if self.closed:
            return 0
        if self.cap - self.used < 4096:
            self._grow(self.cap)
        n = recv(self.fd, self.buf + self.used, self.cap - self.used, MSG_DONTWAIT)
        if n > 0:
            self.used += n
            self.stats.reads += 1
            self._frames(now_ns())
        elif n == 0 or (errno != EAGAIN and errno != EINTR):
            self._lost()
        return 0

    cdef void _lost(self) noexcept:
        if not self.closed:
            self.closed = True
            self.stats.disconnected += 1

    cdef int _frames(self, int64_t t) except -1:
        cdef Py_ssize_t off = 0, hdr, plen
        cdef unsigned char* b
        cdef int op, k
        cdef Stats st = self.stats
        while self.used - off >= 2:
            b = <unsigned char*>self.buf + off
            op = b[0] & 0x0F
            plen = b[1] & 0x7F
            hdr = 2
            if plen == 126:
                if self.used - off < 4:
                    break
                plen = (<Py_ssize_t>b[2] << 8) | b[3]
                hdr = 4
            elif plen == 127:
                if self.used - off < 10:
                    break
                plen = 0
                for k in range(8):
                    plen = (plen << 8) | b[2 + k]
                hdr = 10
            if b[1] & 0x80:                  # servers never mask
                st.bad_frames += 1
                self._lost()
                return 0
            if self.used - off < hdr + plen:
                self._grow(hdr + plen - (self.used - off))
                break
            if op == 1 or op == 2:
                if not (b[0] & 0x80):
                    st.bad_frames += 1
                else:
                    st.frames += 1
                    st.bytes += plen
                    if op == 1:
                        self._message(<char*>b + hdr, plen, t)
                    else:
                        self._binary(<char*>b + hdr, plen, t)
            elif op == 8:
                self.close_code = ((b[hdr] << 8) | b[hdr + 1]) if plen >= 2 else 1005
                st.closed_by_server += 1
                code = st.close_codes.get(self.close_code, 0)
                st.close_codes[self.close_code] = code + 1
                _send_frame(self.fd, 8, <char*>b + hdr, 2 if plen >= 2 else 0)
                self._lost()
                return 0
            elif op == 9:
                _send_frame(self.fd, 10, <char*>b + hdr, plen)
            elif op == 0:
                st.bad_frames += 1
            off += hdr + plen
        if off:
            self.used -= off
            if self.used:
                memmove(self.buf, self.buf + off, self.used)
        return 0

    def close(self):
        if not self.closed:
            _send_frame(self.fd, 8, b"\x03\xe8", 2)
            self.closed = True

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
        elif c == b'e':                                 # error
            self.stats.errors += 1
        else:                                           # ack, pong, heartbeat, status
            self.stats.other_msgs += 1
        return 0

    cdef int _binary(self, char* p, Py_ssize_t n, int64_t t) except -1:
        """An FFB1 update frame: 16-byte header, then 104-byte rows
        (sym S32, seq <i8, ts <i8, ...), as docs/protocol.md says."""
        cdef Py_ssize_t off
        cdef int64_t idx, seq, ts
        cdef char* r
        cdef int k
        if n < 16 or memcmp(p, b"FFB1", 4) != 0:
            self.stats.other_msgs += 1
            return 0
        off = 16
        while off + 104 <= n:
            r = p + off
            idx = -1
            if r[0] == b'S':
                idx = 0
                k = 1
                while k < 32 and b'0' <= r[k] <= b'9':
                    idx = idx * 10 + (r[k] - 48)
                    k += 1
                if k < 32 and r[k] != 0:
                    idx = -1
            memcpy(&seq, r + 32, 8)
            memcpy(&ts, r + 40, 8)
            self._row(idx, seq, ts, t, True)
            off += 104
        return 0

    cdef inline void _row(self, int64_t idx, int64_t seq, int64_t ts, int64_t t,
                          bint live) noexcept:
        cdef Stats st = self.stats
        cdef uint8_t fl
        cdef int64_t lat
        cdef int b
        if idx < 0 or idx >= self.n_instr:
            st.unexpected_rows += 1
            return
        fl = self.flags[idx]
        if not (fl & F_SUB):
            st.unexpected_rows += 1
            return
        if seq > self.seqs[idx]:
            self.seqs[idx] = seq
        elif live:
            st.stale_rows += 1
        if not live:
            st.snapshot_rows += 1
            return
        st.updates += 1
        lat = t - ts
        if lat > st.max_lat_ns:
            st.max_lat_ns = lat
        b = bucket_of(lat)
        st.hist[b] += 1
        if fl & F_WATCH:
            st.whist[b] += 1
            st.watched_updates += 1

    cdef int _rows(self, char* p, char* end, int64_t t, bint live) except -1:
        cdef char* q = _find(p, end, b'"rows"', 6)
        cdef int64_t idx, seq, ts
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
            self._row(idx, seq, ts, t, live)


cdef int _send_frame(int fd, int op, const char* payload, Py_ssize_t n) noexcept:
    """A masked client frame (zero mask key) written with one send; small
    control frames only, so a short write is not retried."""
    cdef unsigned char out[256]
    if n > 125:
        n = 125
    out[0] = 0x80 | op
    out[1] = 0x80 | <unsigned char>n
    memset(out + 2, 0, 4)
    if n:
        memcpy(out + 6, payload, n)
    return <int>send(fd, out, 6 + n, MSG_DONTWAIT | MSG_NOSIGNAL)


cdef class Loop:
    """An epoll loop over every connection of this process.

    `run(seconds, wake_fd)` serves readable sockets until the time is up or
    `wake_fd` (stdin: the runner's commands) is readable; one `recv` per
    ready socket per `epoll_wait`, as a busy client would do.
    """

    cdef:
        int ep
        list by_fd
        epoll_event* events
        int max_events

    def __cinit__(self):
        self.ep = epoll_create1(0)
        if self.ep < 0:
            raise OSError(errno, "epoll_create1")
        self.by_fd = []
        self.max_events = 1024
        self.events = <epoll_event*>calloc(self.max_events, sizeof(epoll_event))
        if self.events == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.events)
        if self.ep >= 0:
            close(self.ep)

    def add(self, Conn c):
        cdef epoll_event ev
        while len(self.by_fd) <= c.fd:
            self.by_fd.append(None)
        self.by_fd[c.fd] = c
        ev.events = EPOLLIN
        ev.data.fd = c.fd
        if epoll_ctl(self.ep, EPOLL_CTL_ADD, c.fd, &ev) < 0:
            raise OSError(errno, "epoll_ctl")

    def watch_fd(self, int fd):
        cdef epoll_event ev
        ev.events = EPOLLIN
        ev.data.fd = fd
        if epoll_ctl(self.ep, EPOLL_CTL_ADD, fd, &ev) < 0:
            raise OSError(errno, "epoll_ctl")

    def run(self, double seconds, int wake_fd=-1):
        """Serve sockets for up to `seconds`; True if `wake_fd` became readable."""
        cdef int64_t until = now_ns() + <int64_t>(seconds * 1e9)
        cdef int64_t left
        cdef int n, i, fd
        cdef bint woken = False
        cdef Conn c
        cdef list by_fd = self.by_fd
        cdef Py_ssize_t nfd = len(by_fd)
        while not woken:
            left = until - now_ns()
            if left <= 0:
                break
            n = epoll_wait(self.ep, self.events, self.max_events,
                           <int>(left // 1000000) + 1)
            if n < 0:
                if errno == EINTR:
                    continue
                raise OSError(errno, "epoll_wait")
            for i in range(n):
                fd = self.events[i].data.fd
                if fd == wake_fd:
                    woken = True
                    continue
                if fd < nfd:
                    c = <Conn>by_fd[fd]
                    c.readable()
                    if c.closed:
                        epoll_ctl(self.ep, EPOLL_CTL_DEL, fd, NULL)
        return woken


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
        cdef int _k, i
        if count <= 0:
            return b"[]"
        if <Py_ssize_t>count * 200 + 16 > self.cap:
            raise ValueError("batch too large")
        self.buf[0] = b'['
        for _k in range(count):
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
