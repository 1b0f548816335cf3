"""Both ends of the wire between the fit's hub and the serving tasks: sealed frames.

The handshake proves that a task holds the fit's key without sending it, and every
later key comes from that key, both ends' fresh nonces and an X25519 exchange::

    hub  -> task   CHALLENGE  magic, version, the hub's nonce, its X25519 share     clear
    task -> hub    HELLO      magic, the task's nonce, its X25519 share             clear
                              + sealed head: task index, attempt, body sizes -- opened
                                before the hub reads (or allocates) any of the body
                              + sealed body: block keys (int64), facts (JSON), floats,
                                the columns its rows touch (int64; sparse data)
    hub  -> task   ACCEPT or REJECT: the first frame (below)

Then every message, either way, is a frame::

    prefix  op, payload bytes                                 clear, covered by the tag
    sealed  pass number, iteration, seed, fraction, payload   AES-256-GCM

Keys (HKDF-SHA256 of the fit's key and the two shares' secret, salted with both nonces:
:mod:`.seal`) are one per connection and direction; a frame's GCM nonce is its sequence
number in its direction. A recording of the whole fit does not open a frame even
where the fit's key itself was readable on the way to the tasks (a closure Spark did
not encrypt: :mod:`.keys`): the shares' secret never travels. So a frame or hello recorded on one connection does not open on another,
and a replayed, dropped, reordered or altered frame does not open at all: the
connection is dropped. The hello's body (the task's facts, its feature moments),
theta, the sums, the DP sampling seed: all sealed. What stays clear is the size of
each frame and its op.

Lengths are checked before anything is allocated: a hello's body only once its sealed
head opened; a frame's payload against the largest the receiver can legitimately get
(a task starts at :data:`FIRST_FRAME`; the hub raises that bound with an OP_LIMIT frame,
sealed, before it sends anything larger). Nothing received is unpickled or eval'd.

The task's handshake lives here too (:func:`connect`, one deadline for connecting,
hello and verdict); what a task does with its frames is :mod:`.task`, its links to
other tasks :mod:`.peers`. The hub's end is :class:`Greeting` (a handshake) and
:class:`Conn` (the frames) read by :class:`Inbound` without ever blocking
(:class:`sparkgd.engine.hub.Hub`).
"""
from __future__ import annotations

import os
import socket
import struct
import threading
import time
from dataclasses import dataclass

import numpy as np

from .seal import TAG, Sealer, Share, Unsealed, derive

MAGIC = b"SGDW"
VERSION = 3
NONCE = 16
_CHALLENGE = struct.Struct("<4sH16s32s")     # magic, version, hub nonce, hub share
_HELLO_CLEAR = struct.Struct("<4s16s32s")    # magic, task nonce, task share
_HELLO_HEAD = struct.Struct("<iiQQQQ")       # index, attempt, keys, facts bytes, floats, cols
# the hello's body: (partition, position, rows) as 3 int64 per block, the facts (JSON),
# the floats (float64: the feature moments at any width), the columns the task's rows
# touch (int64, sorted; sparse data only)
_PREFIX = struct.Struct("<B3xQ")             # op, payload bytes
_HEAD = struct.Struct("<QqQd")               # pass, iteration, seed, fraction (sealed)
(OP_STOP, OP_SUMS, OP_CONFIG, OP_REPLY, OP_ACCEPT, OP_REJECT, OP_ALIVE, OP_PEERS, OP_ADDRESS,
 OP_PEER_FAIL, OP_LIMIT, OP_COLUMNS) = range(12)
# OP_PEERS (hub -> task, JSON): the topology of this epoch and every task's address;
# OP_ADDRESS (task -> hub, JSON): where the task listens for other tasks;
# OP_PEER_FAIL (task -> hub, text): a link to another task failed during the pass;
# OP_LIMIT (hub -> task): the largest payload the hub sends from now on (``iteration``);
# OP_COLUMNS (hub -> task, int64): where each column the task's rows touch sits among
# the fit's columns (``iteration`` of them): the task re-indexes its blocks.
# OP_REPLY and OP_PEER_FAIL carry in ``iteration`` the payload bytes the task sent to
# other tasks during the pass.
OP_LAST = OP_COLUMNS
#: refuse absurd sizes before allocating (2**31 float64 = 16 GiB)
MAX_FLOATS = 1 << 31
MAX_JSON = 1 << 26
MAX_PAYLOAD = 8 * MAX_FLOATS
#: The largest payload a task accepts before the hub has said otherwise (OP_LIMIT).
FIRST_FRAME = 1 << 16
SEED_MOD = 1 << 64
#: Bytes a hub reads of a hello before it allocates anything for its body.
HELLO_HEAD_BYTES = _HELLO_CLEAR.size + _HELLO_HEAD.size + TAG
PREFIX_BYTES = _PREFIX.size
CHALLENGE_BYTES = _CHALLENGE.size


class ProtocolError(ValueError):
    """Bytes that are not a frame of this connection: one that does not open, a wrong
    size or op."""


class HubUnreachable(ConnectionError):
    """A serving task could not reach the fit's hub (firewall, wrong address), or could
    not complete its hello there (a flood on the hub's port, a stranger on the way)."""


#: In a task's error message: the fit then falls back to passes without sockets.
UNREACHABLE_MARKER = "sparkgd-hub-unreachable"


class Keys:
    """The keys of one hub connection: HKDF of the fit's key and the X25519 shares'
    secret, over both nonces."""

    def __init__(self, fit_key, shared, hub_nonce, task_nonce, purpose=b"hub"):
        salt = bytes(hub_nonce) + bytes(task_nonce)
        material = bytes(fit_key) + bytes(shared)
        self.hello = derive(material, salt, purpose + b" hello")
        self.to_task = derive(material, salt, purpose + b" to task")
        self.to_hub = derive(material, salt, purpose + b" to hub")


class Conn:
    """The sealed frames of one connection, at either end: ``send_key`` seals what
    this end sends, ``recv_key`` opens what it receives."""

    def __init__(self, send_key, recv_key):
        self._out, self._in = Sealer(send_key), Sealer(recv_key)

    @property
    def send_seq(self):
        return self._out.seq

    @property
    def recv_seq(self):
        return self._in.seq

    def frame(self, op, payload=b"", pass_no=0, iteration=0, seed=0, fraction=1.0):
        """One frame as buffers to send in order: the clear prefix, the sealed rest.
        ``payload``: one buffer or array, or a list of them (one payload)."""
        body = [as_bytes(p) for p in payload] if isinstance(payload, list) else \
            [as_bytes(payload)]
        size = sum(b.nbytes for b in body)
        head = _HEAD.pack(int(pass_no), int(iteration), int(seed) % SEED_MOD, float(fraction))
        prefix = _PREFIX.pack(op, size)
        plain = head + b"".join(body) if size else head
        return [prefix, self._out.seal(prefix, plain)]

    def open(self, prefix, sealed):
        """The prefix and the sealed rest of a frame -> :class:`Frame`;
        ProtocolError when it does not open (as this connection's next)."""
        op, size = _PREFIX.unpack(bytes(prefix))
        try:
            plain = self._in.open(prefix, sealed)
        except Unsealed as e:
            raise ProtocolError(str(e)) from None
        if len(plain) != _HEAD.size + size:
            raise ProtocolError(f"a frame of {len(plain)} bytes where its prefix says "
                                f"{_HEAD.size + size}")
        pass_no, iteration, seed, fraction = _HEAD.unpack_from(plain)
        return Frame(op, self._in.seq - 1, pass_no, iteration, seed, fraction,
                     memoryview(plain)[_HEAD.size:])


def parse_prefix(prefix, max_payload=MAX_PAYLOAD):
    """-> (op, payload bytes, sealed bytes to read); ProtocolError for an op this
    version does not know or a payload larger than ``max_payload``."""
    op, size = _PREFIX.unpack(bytes(prefix))
    if op > OP_LAST or size > max_payload:
        raise ProtocolError(f"bad frame header (op {op}, {size} bytes)")
    return op, size, sealed_size(size)


def sealed_size(payload_bytes):
    """Bytes after a frame's prefix, for a payload of ``payload_bytes``."""
    return _HEAD.size + int(payload_bytes) + TAG


def frame_bytes(payload_bytes):
    """Bytes a whole frame takes on the wire."""
    return _PREFIX.size + sealed_size(payload_bytes)


@dataclass
class Frame:
    op: int
    seq: int
    pass_no: int
    iteration: int
    seed: int
    fraction: float
    payload: memoryview

    def floats(self):
        return np.frombuffer(self.payload, dtype="<f8")


# ----------------------------------------------------------------- the handshake


class Greeting:
    """The hub's end of one connection's handshake: :meth:`challenge` to send,
    :meth:`head` once :data:`HELLO_HEAD_BYTES` arrived (-> the body's size to read),
    :meth:`body` once those arrived (-> what the task said), then :meth:`conn`.
    ``share``: the hub's X25519 :class:`~.seal.Share` (one per fit)."""

    def __init__(self, fit_key, share):
        self.fit_key, self.share = fit_key, share
        self.nonce = os.urandom(NONCE)
        self.index = self.attempt = None
        self.sizes = None
        self._keys = self._hello = self._clear = None

    def challenge(self):
        return _CHALLENGE.pack(MAGIC, VERSION, self.nonce, self.share.public)

    def head(self, data):
        """The hello's first bytes -> the sealed body's size; ProtocolError when they
        are not this fit's (or claim absurd sizes)."""
        data = bytes(data)
        clear, sealed = data[:_HELLO_CLEAR.size], data[_HELLO_CLEAR.size:]
        magic, task_nonce, task_share = _HELLO_CLEAR.unpack(clear)
        if magic != MAGIC:
            raise ProtocolError("not a task of this fit")
        try:
            shared = self.share.shared(task_share)
            self._keys = Keys(self.fit_key, shared, self.nonce, task_nonce)
            self._hello, self._clear = Sealer(self._keys.hello), clear + self.nonce
            head = self._hello.open(self._clear, sealed)
        except Unsealed:
            raise ProtocolError("not a task of this fit") from None
        index, attempt, nkeys, nfacts, nfloats, ncols = _HELLO_HEAD.unpack(head)
        if nkeys > MAX_FLOATS // 3 or nfacts > MAX_JSON or nfloats > MAX_FLOATS or \
                ncols > MAX_FLOATS:
            raise ProtocolError(f"hello with {nkeys} blocks, {nfacts} bytes of facts, "
                                f"{nfloats} values and {ncols} columns")
        self.index, self.attempt = index, attempt
        self.sizes = (24 * nkeys, nfacts, 8 * nfloats, 8 * ncols)
        return sum(self.sizes) + TAG

    def body(self, data):
        """The sealed body -> (block keys, facts bytes, floats, columns or None)."""
        try:
            body = memoryview(self._hello.open(self._clear, data))
        except Unsealed:
            raise ProtocolError("a hello whose body does not open") from None
        a, b, c, e = self.sizes
        keys = sorted(tuple(int(v) for v in k) for k in
                      np.frombuffer(body[:a], dtype="<i8").reshape(-1, 3))
        floats = np.frombuffer(body[a + b:a + b + c], dtype="<f8").copy()
        cols = np.frombuffer(body[a + b + c:a + b + c + e], dtype="<i8").copy() if e else None
        if cols is not None and cols.size and (cols[0] < 0 or np.any(np.diff(cols) <= 0)):
            raise ProtocolError("a hello whose columns are not sorted, distinct, >= 0")
        return keys, bytes(body[a:a + b]), floats, cols

    def conn(self):
        return Conn(self._keys.to_task, self._keys.to_hub)


def hello_parts(fit_key, hub_nonce, hub_share, index, attempt, keys=(), facts=b"",
                floats=None, columns=None):
    """A task's hello to a hub that sent ``hub_nonce`` and ``hub_share``, as buffers to
    send in order, and its connection's :class:`Keys`."""
    keys = np.asarray(list(keys), dtype="<i8").reshape(-1, 3)
    floats = np.zeros(0) if floats is None else np.ascontiguousarray(floats, dtype="<f8")
    mine, task_nonce = Share(), os.urandom(NONCE)
    try:
        shared = mine.shared(hub_share)
    except Unsealed as e:
        raise ProtocolError(str(e)) from None
    ks = Keys(fit_key, shared, hub_nonce, task_nonce)
    hello = Sealer(ks.hello)
    clear = _HELLO_CLEAR.pack(MAGIC, task_nonce, mine.public)
    cols = np.zeros(0, dtype="<i8") if columns is None else \
        np.ascontiguousarray(columns, dtype="<i8")
    head = _HELLO_HEAD.pack(int(index), int(attempt), keys.shape[0], len(facts), floats.size,
                            cols.size)
    body = as_bytes(keys.ravel()).tobytes() + bytes(facts) + as_bytes(floats).tobytes() + \
        as_bytes(cols).tobytes()
    return [clear, hello.seal(clear + hub_nonce, head),
            hello.seal(clear + hub_nonce, body)], ks


# ----------------------------------------------------------------- sockets


def listen(bind, ports=(0,)):
    """A listening socket on ``bind`` (IPv4 or IPv6), the first free port of ``ports``
    (non-blocking: the hub's; a task's peer listener sets its own)."""
    infos = socket.getaddrinfo(bind, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    last = None
    for port in ports:
        try:
            s = socket.create_server((sockaddr[0], port), family=family,
                                     backlog=socket.SOMAXCONN)
            s.setblocking(False)
            return s
        except OSError as e:
            last = e
    raise OSError(f"no free port on {bind} in {ports[0]}-{ports[-1]}: {last}")


def recv_exact(sock, n, deadline=None):
    """Exactly ``n`` bytes, or EOFError if the peer closed first; with ``deadline``
    (a ``time.monotonic()``), socket.timeout once it passed, however slowly the bytes
    trickle in."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout(f"{got} of {n} bytes in time")
            sock.settimeout(left)
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError(f"connection closed after {got} of {n} bytes")
        got += k
    return buf


def as_bytes(payload):
    """A payload as a byte view: arrays little-endian, without a copy."""
    if isinstance(payload, np.ndarray):
        payload = np.ascontiguousarray(payload, dtype=payload.dtype.newbyteorder("<"))
        return memoryview(payload).cast("B") if payload.size else memoryview(b"")
    return memoryview(payload).cast("B") if len(payload) else memoryview(b"")


def send_parts(sock, parts, patient=None):
    """Send buffers in order with as few system calls (and TCP segments) as the socket
    allows. Blocking; on a non-blocking socket use :func:`send_some`. ``patient``: on a
    socket timeout, keep waiting while ``patient()`` is true (a slow reader is not a
    dead one)."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        try:
            sent = sock.sendmsg(views[:IOV_MAX])
        except socket.timeout:      # nothing was sent by this call
            if patient is not None and patient():
                continue
            raise
        views = _consume(views, sent)


def send_some(sock, views):
    """Non-blocking: send what the socket takes of ``views`` now; -> the views left."""
    try:
        sent = sock.sendmsg(views[:IOV_MAX])
    except (BlockingIOError, InterruptedError):
        return views
    return _consume(views, sent)


#: Buffers per ``sendmsg`` (Linux allows 1024).
IOV_MAX = 64


def _consume(views, sent):
    i = 0
    while i < len(views) and sent >= len(views[i]):
        sent -= len(views[i])
        i += 1
    rest = views[i:]
    if sent:
        rest[0] = rest[0][sent:]
    return rest


class Inbound:
    """Reads one connection's bytes without blocking: a fixed-size piece at a time, into
    a buffer allocated for exactly it."""

    def __init__(self, size):
        self.expect(size)
        self.bytes = 0          # received in all

    def expect(self, size):
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.got = 0

    @property
    def mid_piece(self):
        return 0 < self.got < len(self.buf)

    def fill(self, sock):
        """Read what is there; -> True when the piece is complete. EOFError on close."""
        while self.got < len(self.buf):
            try:
                k = sock.recv_into(self.view[self.got:], len(self.buf) - self.got)
            except (BlockingIOError, InterruptedError):
                return False
            if k == 0:
                raise EOFError("connection closed")
            self.got += k
            self.bytes += k
        return True


# ----------------------------------------------------------------- the task's end

class Channel:
    """A task's end of a sealed connection (blocking): to the hub, or to another task
    (:mod:`.peers`)."""

    def __init__(self, sock, conn, patient=False):
        self.sock, self.conn = sock, conn
        self.heartbeat = 0.0
        self.open = True
        self._patient = (lambda: self.open) if patient else None
        self._lock = threading.Lock()

    def send(self, op, payload=b"", **fields):
        with self._lock:
            send_parts(self.sock, self.conn.frame(op, payload, **fields), self._patient)

    def try_send(self, op):
        """Send a payload-less frame unless another send holds the channel (a
        heartbeat must not wait behind a message a slow reader has not taken yet)."""
        if self._lock.acquire(blocking=False):
            try:
                send_parts(self.sock, self.conn.frame(op), self._patient)
            finally:
                self._lock.release()

    def recv(self, max_payload=MAX_PAYLOAD, deadline=None):
        """The next frame; ProtocolError before allocating more than ``max_payload``
        (nothing is trusted before it opens: the size in the clear prefix is not)."""
        prefix = bytes(recv_exact(self.sock, _PREFIX.size, deadline))
        _, _, rest = parse_prefix(prefix, max_payload)
        return self.conn.open(prefix, recv_exact(self.sock, rest, deadline))

    def close(self):
        self.open = False
        self.sock.close()


#: Seconds a task gives connecting, its hello and the hub's verdict, in all.
CONNECT_SECONDS = 60.0
#: Times a task tries to get through its hello (a connection reset mid-hello: a
#: flooded hub dropped it before it proved itself) before it gives up.
HELLO_TRIES = 4


def connect(address, fit_key, index, attempt, keys=(), facts=b"", floats=None,
            timeout=CONNECT_SECONDS, columns=None):
    """The task's handshake; -> an open :class:`Channel`, or None when the hub refused
    the task. :class:`HubUnreachable` (marked: the fit then falls back) when no
    connection can be made, or none completes its hello, within ``timeout`` seconds
    in all."""
    deadline = time.monotonic() + timeout
    last = None
    for _ in range(HELLO_TRIES):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            sock = socket.create_connection(tuple(address), timeout=left)
        except OSError as e:
            raise HubUnreachable(f"{UNREACHABLE_MARKER}: task {index} cannot reach the "
                                 f"fit's hub at {address[0]}:{address[1]} ({e})") from None
        try:
            return _hello(sock, fit_key, index, attempt, keys, facts, floats, deadline,
                          columns)
        except (OSError, EOFError) as e:    # reset mid-hello, or no verdict in time
            sock.close()
            last = e
        except BaseException:
            sock.close()
            raise
    raise HubUnreachable(f"{UNREACHABLE_MARKER}: task {index} could not complete its hello "
                         f"at the fit's hub {address[0]}:{address[1]} in {timeout:g}s "
                         f"({last or 'no time left'})")


def _hello(sock, fit_key, index, attempt, keys, facts, floats, deadline, columns=None):
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    magic, version, hub_nonce, hub_share = _CHALLENGE.unpack(
        recv_exact(sock, _CHALLENGE.size, deadline))
    if magic != MAGIC or version != VERSION:
        raise ProtocolError("not a sparkgd hub of this version")
    parts, ks = hello_parts(fit_key, hub_nonce, hub_share, index, attempt, keys, facts,
                            floats, columns)
    sock.settimeout(max(0.001, deadline - time.monotonic()))
    send_parts(sock, parts)
    chan = Channel(sock, Conn(ks.to_hub, ks.to_task))
    verdict = chan.recv(FIRST_FRAME, deadline)
    if verdict.op == OP_REJECT:
        sock.close()
        return None
    if verdict.op != OP_ACCEPT:
        raise ProtocolError(f"op {verdict.op} where the hub's verdict was due")
    chan.heartbeat = verdict.fraction
    sock.settimeout(None)
    return chan
