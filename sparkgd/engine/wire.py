"""Both ends of the wire between the driver's hub and the serving tasks.

Frames: fixed ``struct`` headers followed by raw little-endian float64 or JSON, both
length-checked; nothing received is unpickled or eval'd. A task proves it belongs to
this fit with a random per-session secret it got in its closure.

The task's end lives here too: :func:`connect` (the hello and the driver's verdict)
and :func:`serve` (answer requests with :func:`sparkgd.kernels.partition_sums` until
the driver says stop).
"""
from __future__ import annotations

import hmac
import json
import socket
import struct

import numpy as np

MAGIC = b"SGDW"
_HELLO = struct.Struct("<4s32siiQQQ")    # magic, secret, task index, attempt, blocks, facts,
# floats; then (partition, position, rows) as 3 int64 per block, the facts (JSON bytes)
# and an array of float64 (the feature moments: as JSON they would cost ~20 bytes a value);
# the driver answers one byte
ACCEPT, REJECT = b"\x01", b"\x00"
_REQUEST = struct.Struct("<BqdqQ")       # op, iteration, fraction, seed, len(theta)
_REPLY = struct.Struct("<Q")             # len(sums)
OP_STOP, OP_SUMS, OP_CONFIG = 0, 1, 2    # OP_CONFIG: len = bytes of JSON, no reply
#: refuse absurd lengths before allocating (2**31 float64 = 16 GiB)
_MAX_FLOATS = 1 << 31
_MAX_JSON = 1 << 26


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


def pack_hello(secret, index, attempt, keys=(), facts=b"", floats=None):
    """The hello as a list of buffers (for ``sendall`` each: no copy of ``floats``)."""
    keys = np.asarray(list(keys), dtype="<i8").reshape(-1, 3)
    floats = np.zeros(0) if floats is None else np.ascontiguousarray(floats, dtype="<f8")
    return [_HELLO.pack(MAGIC, secret, int(index), int(attempt), keys.shape[0], len(facts),
                        floats.size) + keys.tobytes() + facts, memoryview(floats).cast("B")]


def send_hello(sock, *args, **kwargs):
    for part in pack_hello(*args, **kwargs):
        sock.sendall(part)


def read_hello(sock, secret):
    """-> (index, attempt, sorted block keys, facts bytes, floats); ValueError unless magic
    and secret match."""
    magic, got, index, attempt, count, nfacts, nfloats = _HELLO.unpack(
        recv_exact(sock, _HELLO.size))
    if magic != MAGIC or not hmac.compare_digest(got, secret):
        raise ValueError("not a sparkgd task of this session")
    if count > _MAX_FLOATS // 3 or nfacts > _MAX_JSON or nfloats > _MAX_FLOATS:
        raise ValueError(f"hello with {count} blocks, {nfacts} bytes of facts and "
                         f"{nfloats} values")
    keys = np.frombuffer(recv_exact(sock, 24 * count), dtype="<i8").reshape(-1, 3)
    facts = bytes(recv_exact(sock, nfacts)) if nfacts else b""
    floats = np.frombuffer(recv_exact(sock, 8 * nfloats), dtype="<f8") if nfloats \
        else np.zeros(0)
    return index, attempt, sorted(tuple(int(v) for v in k) for k in keys), facts, floats


def pack_request(op, theta=None, sample=None):
    """``sample``: None (full pass) or (fraction, seed, iteration)."""
    fraction, seed, iteration = (1.0, 0, 0) if sample is None else sample
    theta = np.zeros(0) if theta is None else np.ascontiguousarray(theta, dtype="<f8")
    return _REQUEST.pack(op, int(iteration), float(fraction), int(seed), theta.size) \
        + theta.tobytes()


def pack_config(config):
    """What a serving task that built its own blocks computes: loss and layout (JSON)."""
    body = json.dumps(config).encode()
    return _REQUEST.pack(OP_CONFIG, 0, 1.0, 0, len(body)) + body


def read_request(sock):
    """-> (op, theta, sample or None); for OP_CONFIG, (op, config dict, None)."""
    op, iteration, fraction, seed, size = _REQUEST.unpack(recv_exact(sock, _REQUEST.size))
    if op == OP_CONFIG and size <= _MAX_JSON:
        return op, json.loads(bytes(recv_exact(sock, size))), None
    if op not in (OP_STOP, OP_SUMS) or size > _MAX_FLOATS:
        raise ValueError(f"bad request header (op {op}, {size} values)")
    theta = np.frombuffer(recv_exact(sock, 8 * size), dtype="<f8") if size else np.zeros(0)
    sample = None if fraction >= 1.0 else (fraction, seed, iteration)
    return op, theta, sample


def pack_reply(sums):
    sums = np.ascontiguousarray(sums, dtype="<f8")
    return _REPLY.pack(sums.size) + sums.tobytes()


def read_reply(sock, size):
    (n,) = _REPLY.unpack(recv_exact(sock, _REPLY.size))
    if n != size:
        raise ValueError(f"reply of {n} values, expected {size}")
    return np.frombuffer(recv_exact(sock, 8 * n), dtype="<f8")


# ----------------------------------------------------------------- the task's end

def connect(address, secret, index, attempt, keys=(), facts=b"", floats=None):
    """Open the task's connection and say hello; -> the socket, or None when the driver
    refused the task."""
    sock = socket.create_connection(tuple(address), timeout=60)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        send_hello(sock, secret, index, attempt, keys, facts, floats)
        if recv_exact(sock, 1) != ACCEPT:
            sock.close()
            return None
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock


def serve(sock, blocks, index, threads):
    """Answer the driver until it says stop (or goes away): OP_CONFIG sets the loss and
    layout, OP_SUMS gets this task's ``[loss_sum, weight_sum, grad...]``."""
    from .. import kernels

    loss = layout = None
    while True:
        try:
            op, theta, sample = read_request(sock)
        except EOFError:      # the driver ended the session (or died)
            return
        if op == OP_STOP:
            return
        if op == OP_CONFIG:
            loss = kernels.make_loss(theta["loss"], **theta["params"])
            layout = kernels.Layout(*theta["layout"])
            continue
        if sample is not None:
            sample = sample + (index,)
        sums = kernels.partition_sums(blocks, theta, loss, layout, sample=sample,
                                      threads=threads)
        sock.sendall(pack_reply(sums))
