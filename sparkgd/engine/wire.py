"""Both ends of the wire between the driver's hub and the serving tasks.

The handshake proves a task holds this fit's secret without sending it, and binds
everything after it to this one connection::

    hub  -> task   CHALLENGE  magic, version, the hub's nonce (16 random bytes)
    task -> hub    HELLO      magic, the task's nonce, task index, attempt, body sizes
                              + tag(secret; both nonces, header)  -- checked before
                                the hub reads (or allocates) any of the body
                              + body: block keys (int64), facts (JSON), floats (float64)
                              + tag(secret; both nonces, header, body)
    hub  -> task   ACCEPT or REJECT, the first frame (below)

Then every message, either way, is a frame::

    header: op, sequence number, pass number, iteration, seed, fraction, payload bytes
    payload (raw little-endian float64, or JSON for OP_CONFIG)
    HMAC-SHA256(connection key; direction, header, payload)

The connection key is ``HMAC(secret; both nonces)``: a hello or frame recorded on one
connection is worthless on any other. Sequence numbers (one per direction, from 0)
refuse a replayed, dropped or reordered frame within a connection, and a reply
carries the pass number of the request it answers. Lengths are checked before
anything is allocated; nothing received is unpickled or eval'd.

The task's handshake lives here too (:func:`connect`); what a task does with its
frames is :mod:`.task`, its links to other tasks :mod:`.peers`. The driver's end is
:class:`sparkgd.engine.hub.Hub`, which speaks the same frames without ever blocking
(:class:`Inbound`).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
import threading
from dataclasses import dataclass

import numpy as np

MAGIC = b"SGDW"
VERSION = 2
NONCE = 16
TAG = 32                                     # HMAC-SHA256
_CHALLENGE = struct.Struct("<4sH16s")        # magic, version, hub nonce
_HELLO = struct.Struct("<4s16siiQQQ")        # magic, task nonce, index, attempt, keys,
# facts bytes, floats; + tag; then the body: (partition, position, rows) as 3 int64 per
# block, the facts (JSON), the floats (float64: the feature moments at any width); + tag
_FRAME = struct.Struct("<B3xQQqQdQ")         # op, seq, pass, iteration, seed, fraction, bytes
(OP_STOP, OP_SUMS, OP_CONFIG, OP_REPLY, OP_ACCEPT, OP_REJECT, OP_ALIVE, OP_PEERS, OP_ADDRESS,
 OP_PEER_FAIL) = range(10)
# OP_PEERS (hub -> task, JSON): the topology of this epoch and every task's address;
# OP_ADDRESS (task -> hub, JSON): where the task listens for other tasks;
# OP_PEER_FAIL (task -> hub, text): a link to another task failed during the pass.
# OP_REPLY and OP_PEER_FAIL carry in ``iteration`` the payload bytes the task sent to
# other tasks during the pass.
TO_TASK, TO_HUB = b"D", b"T"                 # the direction a frame's MAC covers
#: refuse absurd sizes before allocating (2**31 float64 = 16 GiB)
MAX_FLOATS = 1 << 31
MAX_JSON = 1 << 26
MAX_PAYLOAD = 8 * MAX_FLOATS
SEED_MOD = 1 << 64


class ProtocolError(ValueError):
    """Bytes that are not a frame of this connection: wrong tag, sequence, size or op."""


class HubUnreachable(ConnectionError):
    """A serving task could not reach the driver's hub (firewall, wrong address)."""


#: In a task's error message: the driver then falls back to passes without sockets.
UNREACHABLE_MARKER = "sparkgd-hub-unreachable"


def tag(key, *parts):
    h = hmac.new(key, digestmod=hashlib.sha256)
    for p in parts:
        h.update(p)
    return h.digest()


def connection_key(secret, hub_nonce, task_nonce):
    return tag(secret, b"sparkgd-connection", hub_nonce, task_nonce)


class Mac:
    """HMAC-SHA256 under one connection's key; keyed once, copied per frame (a fresh
    HMAC object per frame costs several times more)."""

    def __init__(self, key):
        self._base = hmac.new(key, digestmod=hashlib.sha256)

    def __call__(self, *parts):
        h = self._base.copy()
        for p in parts:
            h.update(p)
        return h.digest()


def hello_head_tag(secret, hub_nonce, head):
    return tag(secret, b"sparkgd-hello-head", hub_nonce, head)


def hello_tag(secret, hub_nonce, head, *body):
    return tag(secret, b"sparkgd-hello", hub_nonce, head, *body)


def listen(bind, ports=(0,)):
    """A listening socket on ``bind`` (IPv4 or IPv6), the first free port of ``ports``
    (non-blocking: the hub's; a task's peer listener sets its own timeouts)."""
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


def recv_exact(sock, n):
    """Exactly ``n`` bytes, or EOFError if the peer closed first."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
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


def frame_parts(mac, direction, seq, op, payload=b"", pass_no=0, iteration=0, seed=0,
                fraction=1.0):
    """One frame as buffers to send in order: header, payload, MAC (``mac``: the
    connection's :class:`Mac`). ``payload``: one buffer or array, or a list of them
    sent one after another as one payload (never joined into a copy)."""
    body = [as_bytes(p) for p in payload] if isinstance(payload, list) else \
        [as_bytes(payload)]
    head = _FRAME.pack(op, seq, pass_no, int(iteration), int(seed) % SEED_MOD,
                       float(fraction), sum(b.nbytes for b in body))
    return [head, *body, mac(direction, head, *body)]


def send_parts(sock, parts, patient=None):
    """Send buffers in order with as few system calls (and TCP segments) as the socket
    allows: one ``sendmsg`` for a small frame, not one send per piece. Blocking; on a
    non-blocking socket use :func:`send_some`. ``patient``: on a socket timeout, keep
    waiting while ``patient()`` is true (a slow reader is not a dead one)."""
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


@dataclass
class Frame:
    op: int
    seq: int
    pass_no: int
    iteration: int
    seed: int
    fraction: float
    payload: bytearray

    def floats(self):
        return np.frombuffer(self.payload, dtype="<f8")


def parse_head(head, max_payload=MAX_PAYLOAD):
    op, seq, pass_no, iteration, seed, fraction, size = _FRAME.unpack(head)
    if op > OP_PEER_FAIL or size > max_payload:
        raise ProtocolError(f"bad frame header (op {op}, {size} bytes)")
    return op, seq, pass_no, iteration, seed, fraction, size


def check_frame(mac, direction, expected_seq, head, payload, got):
    """-> the Frame, or ProtocolError when its MAC or sequence number is wrong."""
    op, seq, pass_no, iteration, seed, fraction, _ = parse_head(head)
    if not hmac.compare_digest(bytes(got), mac(direction, head, payload)):
        raise ProtocolError("frame with a wrong MAC")
    if seq != expected_seq:
        raise ProtocolError(f"frame {seq} where {expected_seq} was due (replayed or lost)")
    return Frame(op, seq, pass_no, iteration, seed, fraction, payload)


class Inbound:
    """Reads one connection's bytes without blocking: a fixed-size piece at a time, into
    a buffer allocated for exactly it (large payloads land without copies)."""

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
    """A task's end of an authenticated connection (blocking): to the hub, or to
    another task (:mod:`.peers`, with directions of its own)."""

    def __init__(self, sock, key, send_dir=TO_HUB, recv_dir=TO_TASK, patient=False):
        self.sock, self.mac = sock, Mac(key)
        self.send_dir, self.recv_dir = send_dir, recv_dir
        self.send_seq = self.recv_seq = 0
        self.heartbeat = 0.0
        self.open = True
        self._patient = (lambda: self.open) if patient else None
        self._lock = threading.Lock()

    def send(self, op, payload=b"", **fields):
        with self._lock:
            self._send(op, payload, fields)

    def try_send(self, op):
        """Send a payload-less frame unless another send holds the channel (a
        heartbeat must not wait behind a message a slow reader has not taken yet)."""
        if self._lock.acquire(blocking=False):
            try:
                self._send(op, b"", {})
            finally:
                self._lock.release()

    def _send(self, op, payload, fields):
        parts = frame_parts(self.mac, self.send_dir, self.send_seq, op, payload, **fields)
        self.send_seq += 1
        send_parts(self.sock, parts, self._patient)

    def recv(self, max_payload=MAX_PAYLOAD):
        """The next frame; ProtocolError before allocating more than ``max_payload``."""
        head = bytes(recv_exact(self.sock, _FRAME.size))
        size = parse_head(head, max_payload)[-1]
        rest = memoryview(recv_exact(self.sock, size + TAG))    # payload and MAC at once
        frame = check_frame(self.mac, self.recv_dir, self.recv_seq, head, rest[:size],
                            rest[size:])
        self.recv_seq += 1
        return frame

    def close(self):
        self.open = False
        self.sock.close()


def connect(address, secret, index, attempt, keys=(), facts=b"", floats=None, timeout=60.0):
    """The task's handshake; -> an open :class:`Channel`, or None when the hub refused
    the task. :class:`HubUnreachable` when no connection can be made."""
    try:
        sock = socket.create_connection(tuple(address), timeout=timeout)
    except OSError as e:
        raise HubUnreachable(f"{UNREACHABLE_MARKER}: task {index} cannot reach the driver "
                             f"at {address[0]}:{address[1]} ({e})") from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        magic, version, hub_nonce = _CHALLENGE.unpack(recv_exact(sock, _CHALLENGE.size))
        if magic != MAGIC or version != VERSION:
            raise ProtocolError("not a sparkgd hub of this version")
        nonce = os.urandom(NONCE)
        send_parts(sock, hello_parts(secret, hub_nonce, nonce, index, attempt, keys, facts,
                                     floats))
        chan = Channel(sock, connection_key(secret, hub_nonce, nonce))
        verdict = chan.recv()
        if verdict.op == OP_REJECT:
            sock.close()
            return None
        if verdict.op != OP_ACCEPT:
            raise ProtocolError(f"op {verdict.op} where the hub's verdict was due")
        chan.heartbeat = verdict.fraction
        sock.settimeout(None)
        return chan
    except BaseException:
        sock.close()
        raise


def hello_parts(secret, hub_nonce, nonce, index, attempt, keys=(), facts=b"", floats=None):
    """The hello, as buffers to send in order (the floats without a copy)."""
    keys = np.asarray(list(keys), dtype="<i8").reshape(-1, 3)
    floats = np.zeros(0) if floats is None else np.ascontiguousarray(floats, dtype="<f8")
    body = [as_bytes(keys.ravel()), memoryview(facts), as_bytes(floats)]
    head = _HELLO.pack(MAGIC, nonce, int(index), int(attempt), keys.shape[0], len(facts),
                       floats.size)
    return [head, hello_head_tag(secret, hub_nonce, head), *body,
            hello_tag(secret, hub_nonce, head, *body)]
