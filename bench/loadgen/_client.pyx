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

The book scenario uses the same loop: a connection in book mode
(`Conn.use_books`) keeps each subscribed book's levels in C arrays, applies
the "books" entries of snapshots and updates (price-keyed changes, volume 0
removes, `"full":true` replaces), and times each entry by its `seq` in a ring
the publisher writes (`BookFeed`): book messages carry no source time.

The trades scenario too: a connection in trades mode (`Conn.use_trades`)
takes the "trades" entries of snapshots and updates, keeps the last `tseq`
of each instrument, counts every gap in the sequence as lost (and the
gateway's own `lost` apart), and times each trade by its `ts`.
"""

from libc.stdint cimport int64_t, uint64_t, uint32_t, uint8_t
from libc.stdlib cimport strtod
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
    # levels a load client holds per side of a book (more than any depth served)
    MAXLV = 32
    # levels of the publisher's ladder per side, at most
    MAX_LADDER = 32

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


cdef uint32_t CRC_TABLE[256]


cdef void _crc_init() noexcept:
    cdef uint32_t c
    cdef int i, _k
    for i in range(256):
        c = <uint32_t>i
        for _k in range(8):
            c = (0xEDB88320 ^ (c >> 1)) if (c & 1) else (c >> 1)
        CRC_TABLE[i] = c


_crc_init()


cdef inline uint32_t _crc(uint32_t crc, const uint8_t* p, Py_ssize_t n) noexcept nogil:
    """zlib.crc32(bytes, crc): IEEE 802.3, chainable."""
    cdef Py_ssize_t i
    crc = ~crc
    for i in range(n):
        crc = CRC_TABLE[(crc ^ p[i]) & 0xFF] ^ (crc >> 8)
    return ~crc


cdef uint32_t _book_crc(const double* bids, int nb, const double* asks, int na,
                        int depth) noexcept nogil:
    """The contract's book checksum: the best `depth` asks, then bids, best
    first, price and volume as little-endian binary64 (this is x86/ARM LE).
    A side is `n` (price, volume) pairs."""
    cdef uint32_t crc = 0
    cdef int k
    for k in range(min(na, depth)):
        crc = _crc(crc, <const uint8_t*>(asks + 2 * k), 16)
    for k in range(min(nb, depth)):
        crc = _crc(crc, <const uint8_t*>(bids + 2 * k), 16)
    return crc


def checksum(list bids, list asks, int depth):
    """The C checksum of two sides of [price, volume, ...] (tests compare it
    with fastfeed.orderbook.book_checksum)."""
    cdef double b[2 * MAXLV]
    cdef double a[2 * MAXLV]
    cdef int nb = min(len(bids), MAXLV), na = min(len(asks), MAXLV), k
    for k in range(nb):
        b[2 * k] = bids[k][0]
        b[2 * k + 1] = bids[k][1]
    for k in range(na):
        a[2 * k] = asks[k][0]
        a[2 * k + 1] = asks[k][1]
    return _book_crc(b, nb, a, na, depth)


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
        # book mode: source changes brought (seq advance), levels applied,
        # entries whose seq fell out of the publisher's ring (not timed)
        public int64_t changes, levels, untimed
        # trades mode: tseq gaps (lost trades) and the gateway's `lost` counts
        public int64_t lost, gw_lost
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
        self.changes = 0
        self.levels = 0
        self.untimed = 0
        self.lost = 0
        self.gw_lost = 0

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
        # book mode (use_books): slot of each instrument's book or -1; per
        # slot and side (0 bids, 1 asks) up to MAXLV (price, volume) pairs
        bint books
        int depth
        bint truncate
        int* slot
        double* lv
        int* nlv
        const int64_t* ring
        int64_t ring_mask
        object ring_ref
        # trades mode (use_trades): `seqs` holds each instrument's last tseq
        bint trades
        public int64_t lost, gw_lost

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
        self.books = False
        self.slot = NULL
        self.lv = NULL
        self.nlv = NULL
        self.ring = NULL
        self.trades = False
        self.lost = 0
        self.gw_lost = 0
        stats.connected += 1

    def __dealloc__(self):
        free(self.seqs)
        free(self.flags)
        free(self.buf)
        free(self.slot)
        free(self.lv)
        free(self.nlv)

    def use_books(self, int depth, bint truncate, const int64_t[:] ring, int ring_size):
        """Book mode: every subscribed instrument is a book. `depth` is the
        served depth (the checksum's); with `truncate` the client keeps only
        the best `depth` levels per side after each entry, as the contract
        says (fastfeed); without, every level it is sent (a peer forwarding
        every change). `ring`: the publisher's (seq, send ns) pairs,
        `ring_size` (a power of two) per instrument."""
        cdef int i, n = 0
        if ring_size & (ring_size - 1) or ring.shape[0] < 2 * ring_size * self.n_instr:
            raise ValueError("ring_size must be a power of two and the ring hold every instrument")
        self.slot = <int*>malloc(self.n_instr * sizeof(int))
        if self.slot == NULL:
            raise MemoryError()
        for i in range(self.n_instr):
            if self.flags[i] & F_SUB:
                self.slot[i] = n
                n += 1
            else:
                self.slot[i] = -1
        self.lv = <double*>calloc(max(n, 1) * 2 * MAXLV * 2, sizeof(double))
        self.nlv = <int*>calloc(max(n, 1) * 2, sizeof(int))
        if self.lv == NULL or self.nlv == NULL:
            raise MemoryError()
        self.depth = depth
        self.truncate = truncate
        self.ring_ref = ring
        self.ring = &ring[0]
        self.ring_mask = ring_size - 1
        self.books = True

    def use_trades(self):
        """Trades mode: every subscription is to the trades channel; each
        trade's `tseq` must be the instrument's previous + 1 (a gap is lost)."""
        self.trades = True

    def trades_behind(self, const int64_t[:] final):
        """Trades of the subscribed instruments not received by the end: the
        publisher's last tseq minus the last one held."""
        cdef int i
        cdef int64_t n = 0
        for i in range(self.n_instr):
            if (self.flags[i] & F_SUB) and self.seqs[i] < final[i]:
                n += final[i] - self.seqs[i]
        return n

    def last_tseq(self, int i):
        return self.seqs[i]

    def books_behind(self, const int64_t[:] seqs, const int64_t[:] crcs):
        """Subscribed books whose seq or checksum differ from the publisher's."""
        cdef int i, s, n = 0
        cdef uint32_t crc
        if not self.books:
            raise ValueError("not in book mode (use_books)")
        for i in range(self.n_instr):
            s = self.slot[i]
            if s < 0:
                continue
            crc = _book_crc(self.lv + (2 * s) * 2 * MAXLV, self.nlv[2 * s],
                            self.lv + (2 * s + 1) * 2 * MAXLV, self.nlv[2 * s + 1], self.depth)
            if self.seqs[i] != seqs[i] or crc != <uint32_t>crcs[i]:
                n += 1
        return n

    def book(self, int i):
        """Instrument `i`'s book as (seq, bids, asks), levels [price, volume]."""
        cdef int s, side, k
        if not self.books or not 0 <= i < self.n_instr or self.slot[i] < 0:
            raise ValueError(f"instrument {i} is no book of this connection")
        s = self.slot[i]
        out = [self.seqs[i]]
        for side in range(2):
            base = self.lv + (2 * s + side) * 2 * MAXLV
            out.append([[base[2 * k], base[2 * k + 1]] for k in range(self.nlv[2 * s + side])])
        return tuple(out)

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

    def converged(self, const int64_t[:] final, crcs=None):
        """True when every subscribed instrument is at the publisher's last
        seq (book mode: and every book's checksum is the publisher's)."""
        cdef int i
        if self.closed or not self.got_snapshot:
            return False
        if self.books:
            return self.books_behind(final, crcs) == 0
        if self.trades and self.lost:
            return False      # a gap: the sequence is not complete
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
            if self.trades:
                self._trades(q, end, t, True)
            elif self.books:
                self._books(q, end, t, True)
            else:
                self._rows(q, end, t, True)
        elif c == b's' and q[1] == b'n':               # snapshot
            self.stats.snapshots += 1
            if self.trades:
                self._trades(q, end, t, False)
            elif self.books:
                self._books(q, end, t, False)
            else:
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
        if n >= 16 and memcmp(p, b"FFC1", 4) == 0:
            return self._compact(<unsigned char*>p, n, t)
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

    cdef int _compact(self, const unsigned char* p, Py_ssize_t n, int64_t t) except -1:
        """An FFC1 frame (fastfeed.v1.compact.bin): per row the symbol, mask,
        varint seq, zigzag varint (frame t - ts) if bit 0, then value tokens,
        skipped (docs/protocol.md). A row without ts is counted, not timed."""
        cdef Py_ssize_t off = 16
        cdef int64_t idx, frame_t, ts
        cdef uint64_t u, seq
        cdef int k, j, ln, mask, shift
        memcpy(&frame_t, p + 8, 8)
        while off < n:
            ln = p[off]
            idx = -1
            if ln > 1 and p[off + 1] == b'S':
                idx = 0
                for k in range(2, ln + 1):
                    if not b'0' <= p[off + k] <= b'9':
                        idx = -1
                        break
                    idx = idx * 10 + (p[off + k] - 48)
            off += 1 + ln
            mask = p[off]
            off += 1
            # varints: seq, then (bit 0) t - ts, then one per value bit
            ts = -1
            for j in range(9):
                if j == 1 and not mask & 1:
                    continue
                if j >= 2 and not mask & (1 << (j - 1)):
                    continue
                u = 0
                shift = 0
                while off < n and p[off] & 0x80:
                    u |= <uint64_t>(p[off] & 0x7F) << shift
                    shift += 7
                    off += 1
                if off >= n:
                    self.stats.bad_frames += 1
                    return 0
                u |= <uint64_t>p[off] << shift
                off += 1
                if j == 0:
                    seq = u
                elif j == 1:
                    ts = frame_t - <int64_t>((u >> 1) ^ (0 - (u & 1)))
                elif u == 31:
                    off += 8  # a double follows the token
            if ts < 0:
                self.stats.untimed += 1
            self._row(idx, <int64_t>seq, ts if ts >= 0 else t, t, True)
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

    # -- trades mode --------------------------------------------------------

    cdef int _trades(self, char* p, char* end, int64_t t, bint live) except -1:
        """Every entry of the message's "trades" list: {"sym", "lost"?,
        "items" (update) or "recent" (snapshot): [[tseq, ts, ...], ...]}."""
        cdef char* q = _find(p, end, b'"trades"', 8)
        cdef char* key
        cdef char* items
        cdef Py_ssize_t klen
        cdef int64_t idx, n
        if q == NULL:
            return 0
        q += 8
        while q < end and q[0] != b'[':
            q += 1
        q += 1
        while True:
            while q < end and (q[0] == b' ' or q[0] == b',' or q[0] == b'\n'):
                q += 1
            if q >= end or q[0] != b'{':
                return 0
            q += 1
            idx = -1
            items = NULL
            while True:
                while q < end and (q[0] == b' ' or q[0] == b',' or q[0] == b'\n'):
                    q += 1
                if q >= end:
                    return 0
                if q[0] == b'}':
                    q += 1
                    break
                if q[0] != b'"':
                    return 0
                key = q + 1
                q = key
                while q < end and q[0] != b'"':
                    q += 1
                klen = q - key
                q += 1
                while q < end and (q[0] == b':' or q[0] == b' '):
                    q += 1
                if q >= end:
                    return 0
                if klen == 3 and memcmp(key, b"sym", 3) == 0:
                    idx = _sym_index(q + 1, end)
                    q = _skip_value(q, end)
                elif klen == 4 and memcmp(key, b"lost", 4) == 0:
                    q = _int(q, end, &n)
                    self.gw_lost += n
                    self.stats.gw_lost += n
                elif (klen == 5 and memcmp(key, b"items", 5) == 0) or (
                        klen == 6 and memcmp(key, b"recent", 6) == 0):
                    items = q
                    q = _skip_value(q, end)
                else:
                    q = _skip_value(q, end)
            if items != NULL:
                self._items(idx, items, end, t, live)

    cdef void _items(self, int64_t idx, char* q, char* end, int64_t t, bint live) noexcept:
        cdef Stats st = self.stats
        cdef int64_t tseq, ts, lat, held
        cdef int b
        cdef bint ok = 0 <= idx < self.n_instr and (self.flags[idx] & F_SUB)
        q += 1
        while True:
            while q < end and (q[0] == b' ' or q[0] == b',' or q[0] == b'\n'):
                q += 1
            if q >= end or q[0] != b'[':
                return
            q += 1
            while q < end and q[0] == b' ':
                q += 1
            q = _int(q, end, &tseq)
            q = _skip_sep(q, end)
            q = _int(q, end, &ts)
            while q < end and q[0] != b']':
                q += 1
            q += 1
            if not ok:
                st.unexpected_rows += 1
                continue
            held = self.seqs[idx]
            if not live:
                if tseq > held:
                    self.seqs[idx] = tseq
                st.snapshot_rows += 1
                continue
            if tseq <= held:
                st.stale_rows += 1
                continue
            if tseq > held + 1:
                self.lost += tseq - held - 1
                st.lost += tseq - held - 1
            self.seqs[idx] = tseq
            st.updates += 1
            lat = t - ts
            if lat > st.max_lat_ns:
                st.max_lat_ns = lat
            b = bucket_of(lat)
            st.hist[b] += 1

    # -- book mode ----------------------------------------------------------

    cdef int _books(self, char* p, char* end, int64_t t, bint live) except -1:
        """Every entry of the message's "books" list."""
        cdef char* q = _find(p, end, b'"books"', 7)
        if q == NULL:
            return 0
        q += 7
        while q < end and q[0] != b'[':
            q += 1
        q += 1
        while True:
            while q < end and (q[0] == b' ' or q[0] == b',' or q[0] == b'\n'):
                q += 1
            if q >= end or q[0] != b'{':
                return 0
            q = self._entry(q, end, t, live)

    cdef char* _entry(self, char* q, char* end, int64_t t, bint live) except NULL:
        """One book entry (q at its '{'); returns the position after it. Its
        keys come in any order ("full" is last in fastfeed's), so the level
        lists are only located here and applied once the entry is read."""
        cdef int64_t idx = -1, seq = 0
        cdef char* bids = NULL
        cdef char* asks = NULL
        cdef char* key
        cdef Py_ssize_t klen
        cdef bint full = not live
        q += 1
        while True:
            while q < end and (q[0] == b' ' or q[0] == b',' or q[0] == b'\n'):
                q += 1
            if q >= end:
                return end
            if q[0] == b'}':
                q += 1
                break
            if q[0] != b'"':
                return end
            key = q + 1
            q = key
            while q < end and q[0] != b'"':
                q += 1
            klen = q - key
            q += 1
            while q < end and (q[0] == b':' or q[0] == b' '):
                q += 1
            if q >= end:
                return end
            if klen == 3 and memcmp(key, b"sym", 3) == 0:
                idx = _sym_index(q + 1, end)
                q = _skip_value(q, end)
            elif klen == 3 and memcmp(key, b"seq", 3) == 0:
                q = _int(q, end, &seq)
            elif klen == 4 and memcmp(key, b"bids", 4) == 0:
                bids = q
                q = _skip_value(q, end)
            elif klen == 4 and memcmp(key, b"asks", 4) == 0:
                asks = q
                q = _skip_value(q, end)
            elif klen == 4 and memcmp(key, b"full", 4) == 0:
                full = full or q[0] == b't'
                q = _skip_value(q, end)
            else:
                q = _skip_value(q, end)
        self._apply(idx, seq, bids, asks, full, end, t, live)
        return q

    cdef void _apply(self, int64_t idx, int64_t seq, char* bids, char* asks, bint full,
                     char* end, int64_t t, bint live) noexcept:
        cdef Stats st = self.stats
        cdef int s, side
        cdef int64_t held, lat, pos
        cdef int b
        if idx < 0 or idx >= self.n_instr or self.slot[idx] < 0:
            st.unexpected_rows += 1
            return
        s = self.slot[idx]
        held = self.seqs[idx]
        if live and seq <= held:
            st.stale_rows += 1
            return
        if full:
            self.nlv[2 * s] = 0
            self.nlv[2 * s + 1] = 0
        if bids != NULL:
            self._levels(s, 0, bids, end)
        if asks != NULL:
            self._levels(s, 1, asks, end)
        if self.truncate:
            for side in range(2):
                if self.nlv[2 * s + side] > self.depth:
                    self.nlv[2 * s + side] = self.depth
        self.seqs[idx] = seq
        if not live:
            st.snapshot_rows += 1
            return
        st.updates += 1
        st.changes += seq - held
        pos = (idx * (self.ring_mask + 1) + (seq & self.ring_mask)) * 2
        if self.ring[pos] != seq:      # overwritten: older than the ring holds
            st.untimed += 1
            return
        lat = t - self.ring[pos + 1]
        if lat > st.max_lat_ns:
            st.max_lat_ns = lat
        b = bucket_of(lat)
        st.hist[b] += 1

    cdef void _levels(self, int s, int side, char* q, char* end) noexcept:
        """Apply a list of [price, volume(, orders)] to one side, in order."""
        cdef double price, vol
        cdef char* nxt
        q += 1
        while True:
            while q < end and (q[0] == b' ' or q[0] == b',' or q[0] == b'\n'):
                q += 1
            if q >= end or q[0] != b'[':
                return
            q += 1
            price = strtod(q, &nxt)
            q = _skip_sep(nxt, end)
            vol = strtod(q, &nxt)
            q = nxt
            while q < end and q[0] != b']':
                q += 1
            q += 1
            self._set(s, side, price, vol)
            self.stats.levels += 1

    cdef void _set(self, int s, int side, double price, double vol) noexcept:
        """Set or (volume 0) remove one price, keeping the side sorted best first."""
        cdef double* a = self.lv + (2 * s + side) * 2 * MAXLV
        cdef int n = self.nlv[2 * s + side], i = 0
        while i < n and a[2 * i] != price and (
                a[2 * i] > price if side == 0 else a[2 * i] < price):
            i += 1
        if i < n and a[2 * i] == price:
            if vol == 0:
                memmove(a + 2 * i, a + 2 * i + 2, (n - i - 1) * 2 * sizeof(double))
                self.nlv[2 * s + side] = n - 1
            else:
                a[2 * i + 1] = vol
            return
        if vol == 0 or i >= MAXLV:
            return
        if n == MAXLV:                  # full: the worst level goes
            n -= 1
        memmove(a + 2 * i + 2, a + 2 * i, (n - i) * 2 * sizeof(double))
        a[2 * i] = price
        a[2 * i + 1] = vol
        self.nlv[2 * s + side] = n + 1


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


cdef inline int64_t _sym_index(char* q, char* end) noexcept:
    """`S` + digits up to the closing quote as an instrument index, else -1."""
    cdef int64_t idx = 0
    if q >= end or q[0] != b'S':
        return -1
    q += 1
    while q < end and b'0' <= q[0] <= b'9':
        idx = idx * 10 + (q[0] - 48)
        q += 1
    if q >= end or q[0] != b'"':
        return -1
    return idx


cdef char* _skip_value(char* q, char* end) noexcept:
    """Past one JSON value (string, number, literal, or nested list/object)."""
    cdef int depth = 0
    while q < end:
        if q[0] == b'"':
            q += 1
            while q < end and q[0] != b'"':
                if q[0] == b'\\':
                    q += 1
                q += 1
            q += 1
            if depth == 0:
                return q
            continue
        if q[0] == b'[' or q[0] == b'{':
            depth += 1
        elif q[0] == b']' or q[0] == b'}':
            if depth == 0:
                return q
            depth -= 1
            if depth == 0:
                return q + 1
        elif depth == 0 and q[0] == b',':
            return q
        q += 1
    return end


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
        int64_t* tseq
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
        self.tseq = <int64_t*>calloc(n_instr, sizeof(int64_t))
        self.px = <double*>calloc(n_instr, sizeof(double))
        self.vol = <int64_t*>calloc(n_instr, sizeof(int64_t))
        self.table = <uint32_t*>calloc(65536, sizeof(uint32_t))
        self.cap = 1 << 20
        self.buf = <char*>calloc(self.cap, 1)
        if not (self.seq and self.tseq and self.px and self.vol and self.table and self.buf):
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
        free(self.tseq)
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

    def trades(self, int count, int64_t ts):
        """A JSON array of `count` contract trades (`{"type":"trade",...}`)
        stamped `ts`, by the same activity as the ticks; `tseq` consecutive
        per instrument from 1."""
        cdef Py_ssize_t off = 1
        cdef int _k, i
        cdef uint64_t r
        if count <= 0:
            return b"[]"
        if <Py_ssize_t>count * 120 + 16 > self.cap:
            raise ValueError("batch too large")
        self.buf[0] = b'['
        for _k in range(count):
            r = self._next()
            i = <int>self.table[r >> 48]
            self.tseq[i] += 1
            off += snprintf(
                self.buf + off, self.cap - off,
                b'{"type":"trade","sym":"S%04d","tseq":%lld,"ts":%lld,"price":%.2f,'
                b'"size":%d,"side":"%s"},',
                i, <long long>self.tseq[i], <long long>ts, self.px[i],
                <int>((r >> 16) % 500) + 1, b"b" if r & 1 else b"s")
        self.buf[off - 1] = b']'
        return self.buf[:off]

    def final_tseqs(self):
        cdef int i
        return [self.tseq[i] for i in range(self.n)]


cdef class BookFeed:
    """Skewed order-book changes for the book scenario, one level change per
    ingest message (`{"type":"book",...}` as the contract's ingest says).

    Each instrument has a fixed ladder of `levels` prices per side around its
    mid (bids below, asks above: never crossed), all filled at the start.
    A change picks an instrument by the same Zipf-like table as `TickGen`, a
    side, and a ladder step skewed to the top (step k about 0.8^k as likely
    as the top), then sets a new volume there or (one in seven, when it is
    held) removes it; a removed step comes back on its next change. `seq`
    is consecutive per book. Every change's send time goes into `ring`
    (pairs of seq and ns, `ring_size` a power of two per instrument), which
    the load clients read: book messages carry no source time."""

    cdef:
        int n, levels, depth
        double* price
        double* vol
        int64_t* seq
        uint32_t* table
        uint8_t* steps
        uint64_t rng
        int64_t* ring
        int64_t ring_mask
        object ring_ref
        char* buf
        Py_ssize_t cap
        public int64_t changes

    def __cinit__(self, int n_instr, list table, int64_t[:] ring, int ring_size,
                  int levels=15, int depth=10, uint64_t seed=12345):
        cdef int i, side, k
        cdef double mid, acc, w
        if not 1 <= levels <= MAX_LADDER:
            raise ValueError(f"levels must be 1..{MAX_LADDER}")
        if len(table) != 65536:
            raise ValueError("table must hold 65536 instrument indexes")
        if ring_size & (ring_size - 1) or ring.shape[0] < 2 * ring_size * n_instr:
            raise ValueError("ring_size must be a power of two and the ring hold every instrument")
        self.n = n_instr
        self.levels = levels
        self.depth = depth
        self.price = <double*>calloc(n_instr * 2 * levels, sizeof(double))
        self.vol = <double*>calloc(n_instr * 2 * levels, sizeof(double))
        self.seq = <int64_t*>calloc(n_instr, sizeof(int64_t))
        self.table = <uint32_t*>calloc(65536, sizeof(uint32_t))
        self.steps = <uint8_t*>calloc(65536, 1)
        self.cap = 1 << 20
        self.buf = <char*>calloc(self.cap, 1)
        if not (self.price and self.vol and self.seq and self.table and self.steps and self.buf):
            raise MemoryError()
        for i in range(65536):
            self.table[i] = table[i]
        # ladder step k drawn with weight 0.8^k
        acc = 0.0
        w = 0.0
        for k in range(levels):
            w += 0.8 ** k
        k = 0
        for i in range(65536):
            while k < levels - 1 and (i + 0.5) / 65536.0 > (acc + 0.8 ** k) / w:
                acc += 0.8 ** k
                k += 1
            self.steps[i] = <uint8_t>k
        self.rng = seed * 6364136223846793005ULL + 1442695040888963407ULL
        if self.rng == 0:
            self.rng = 88172645463325252ULL
        self.ring_ref = ring
        self.ring = &ring[0]
        self.ring_mask = ring_size - 1
        for i in range(n_instr):
            mid = 1000.0 + 25.0 * (i % 97)
            for side in range(2):
                for k in range(levels):
                    self.price[(i * 2 + side) * levels + k] = (
                        mid - 5.0 * (k + 1) if side == 0 else mid + 5.0 * (k + 1))
                    self.vol[(i * 2 + side) * levels + k] = self._lots() * 100.0
        self.changes = 0

    def __dealloc__(self):
        free(self.price)
        free(self.vol)
        free(self.seq)
        free(self.table)
        free(self.steps)
        free(self.buf)

    cdef inline uint64_t _next(self) noexcept:
        cdef uint64_t x = self.rng
        x ^= x >> 12
        x ^= x << 25
        x ^= x >> 27
        self.rng = x
        return x * 2685821657736338717ULL

    cdef inline int _lots(self) noexcept:
        return <int>(self._next() % 60) + 1

    cdef inline void _stamp(self, int i, int64_t ts) noexcept:
        cdef int64_t pos = (i * (self.ring_mask + 1) + (self.seq[i] & self.ring_mask)) * 2
        self.ring[pos + 1] = ts
        self.ring[pos] = self.seq[i]

    cdef Py_ssize_t _full(self, Py_ssize_t off, int i, int64_t ts) noexcept:
        cdef int side, k
        cdef double v
        self.seq[i] += 1
        self._stamp(i, ts)
        off += snprintf(self.buf + off, self.cap - off,
                        b'{"type":"book","sym":"S%04d","seq":%lld,"full":true',
                        i, <long long>self.seq[i])
        for side in range(2):
            off += snprintf(self.buf + off, self.cap - off, b',"%s":[',
                            b"bids" if side == 0 else b"asks")
            for k in range(self.levels):
                v = self.vol[(i * 2 + side) * self.levels + k]
                if v > 0:
                    off += snprintf(self.buf + off, self.cap - off, b'[%.1f,%.1f,%d],',
                                    self.price[(i * 2 + side) * self.levels + k], v,
                                    <int>(v / 400.0) + 1)
            if self.buf[off - 1] == b',':
                off -= 1
            self.buf[off] = b']'
            off += 1
        self.buf[off] = b'}'
        self.buf[off + 1] = b','
        return off + 2

    cdef Py_ssize_t _change(self, Py_ssize_t off, int64_t ts) noexcept:
        cdef uint64_t r = self._next()
        cdef int i = <int>self.table[r >> 48]
        cdef int side = <int>((r >> 20) & 1)
        cdef int k = self.steps[(r >> 24) & 0xFFFF]
        cdef Py_ssize_t at = (i * 2 + side) * self.levels + k
        cdef double v = self.vol[at], nv
        if v > 0 and ((r >> 8) & 0xFF) < 37:
            nv = 0.0
        else:
            nv = self._lots() * 100.0
            if nv == v:
                nv += 100.0
        self.vol[at] = nv
        self.seq[i] += 1
        self._stamp(i, ts)
        self.changes += 1
        return off + snprintf(
            self.buf + off, self.cap - off,
            b'{"type":"book","sym":"S%04d","seq":%lld,"%s":[[%.1f,%.1f,%d]]},',
            i, <long long>self.seq[i], b"bids" if side == 0 else b"asks", self.price[at], nv,
            <int>(nv / 400.0) + <int>(nv > 0))

    def batch(self, int count, int64_t ts):
        """A JSON array of `count` one-level changes stamped `ts` (bytes)."""
        cdef Py_ssize_t off = 1
        cdef int _k
        if count <= 0:
            return b"[]"
        if <Py_ssize_t>count * 120 + 16 > self.cap:
            raise ValueError("batch too large")
        self.buf[0] = b'['
        for _k in range(count):
            off = self._change(off, ts)
        self.buf[off - 1] = b']'
        return self.buf[:off]

    def seed_all(self, int64_t ts):
        """One full book per instrument, in arrays of a few hundred KB."""
        cdef Py_ssize_t off = 1
        cdef int i
        out = []
        self.buf[0] = b'['
        for i in range(self.n):
            off = self._full(off, i, ts)
            if off > self.cap - (self.levels * 2 * 40 + 200) or i == self.n - 1:
                self.buf[off - 1] = b']'
                out.append(self.buf[:off])
                off = 1
        return out

    def final(self):
        """The last seq and the contract checksum (best `depth` levels) of every book."""
        cdef int i, side, k, m
        cdef double lv[2][2 * MAX_LADDER]
        cdef int nl[2]
        seqs, crcs = [], []
        for i in range(self.n):
            for side in range(2):
                m = 0
                for k in range(self.levels):
                    if self.vol[(i * 2 + side) * self.levels + k] > 0:
                        lv[side][2 * m] = self.price[(i * 2 + side) * self.levels + k]
                        lv[side][2 * m + 1] = self.vol[(i * 2 + side) * self.levels + k]
                        m += 1
                nl[side] = m
            seqs.append(self.seq[i])
            crcs.append(_book_crc(lv[0], nl[0], lv[1], nl[1], self.depth))
        return {"seqs": seqs, "crcs": crcs}

    def book(self, int i):
        """Instrument `i`'s true book as (seq, bids, asks), levels [price, volume]."""
        if not 0 <= i < self.n:
            raise IndexError(i)
        out = [self.seq[i]]
        for side in range(2):
            out.append([[self.price[(i * 2 + side) * self.levels + k],
                         self.vol[(i * 2 + side) * self.levels + k]]
                        for k in range(self.levels)
                        if self.vol[(i * 2 + side) * self.levels + k] > 0])
        return tuple(out)


def bucket_index(int64_t lat_ns):
    """Python access to the bucket function (tests compare it with hist.py)."""
    return bucket_of(lat_ns)
