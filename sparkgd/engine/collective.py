"""How the serving tasks combine a pass: who talks to whom, what each message holds,
and how many bytes each link carries. Pure: no sockets, no Spark.

A pass sends theta (``n`` float64) to every task and brings back the sum over tasks of
``[loss_sum, weight_sum, grad (n)]``. Three topologies (``topology``):

* ``star``: the driver sends theta to every task and adds their replies in task order.
* ``tree`` (the default): the tasks form a heap with fan-in ``f`` (:func:`fan_in`, the
  scale ``treeAggregate`` uses for ``aggregationDepth``): task ``i``'s parent is
  ``(i - 1) // f``. The driver sends theta to task 0, every task forwards it to its
  children, adds its children's sums to its own in ascending child order and sends the
  result to its parent; task 0 sends the total to the driver.
* ``ring``: theta's ``P`` chunks (:func:`chunk_bounds`) go one to each task, then an
  all-gather around the ring (task ``i`` sends to ``i + 1``) gives every task all of
  theta; the sums go round in a reduce-scatter: chunk ``c`` starts at task ``c`` and
  each next task adds its own part, so task ``c - 1`` ends with the total of chunk ``c``
  and sends it to the driver. The loss and weight sums ride with chunk 0.

Every order of addition is fixed by ``P`` alone, so a pass is reproducible run to run;
the topologies differ only in rounding (float64, ~1e-16 relative per addition).

In a tree the driver talks to task 0 alone: the others hear of a pass from their
parent (theta's frame carries the pass's header), and each message of sums carries the
bytes its subtree sent to other tasks, so task 0's reply tells the driver every link's
count. In a ring every task answers the driver (its chunk) with the bytes it sent.

**Compression.** A lossy codec (:mod:`sparkgd.codecs`) encodes every message of sums on
every link: each hop decodes what it received, adds in float64, and encodes again --
a top-k vector does not stay sparse when summed, so each hop sends its own top ``k``,
and a task's error-feedback residual covers everything *it* sent (tree: its one
vector up; ring: each chunk it passes on). Theta goes down as the difference from what
the tasks already hold, encoded once by the driver and forwarded verbatim, so every
task holds the same vector; the driver keeps the exact theta, and what the encoding
left out stays in the difference sent next pass (error feedback on the driver's
side). After a task joins (or a pass is restarted) theta goes in full.

Byte counts here are payload bytes (frame headers, 80 bytes each, not counted), the
same figures the engine counts on the wire (:func:`pass_bytes`).
"""
from __future__ import annotations

import math
import struct

import numpy as np

from .. import codecs

from ..comm import TOPOLOGIES  # noqa: E402  (one list: how serving tasks combine a pass)

_HEAD = 16                       # loss_sum, weight_sum: float64, never encoded
THETA_FULL, THETA_DELTA = 0, 1   # the first byte of a theta message
_KIND = struct.Struct("<B")


# ----------------------------------------------------------------- who talks to whom

def fan_in(num_tasks, depth):
    """Children per task of the tree: ``treeAggregate``'s scale for ``depth``."""
    return max(int(math.ceil(num_tasks ** (1.0 / max(int(depth), 1)))), 2)


def tree_parent(i, f):
    return None if i == 0 else (i - 1) // f


def tree_children(i, num_tasks, f):
    return list(range(f * i + 1, min(f * i + f, num_tasks - 1) + 1))


def tree_height(num_tasks, f):
    """Task-to-task hops from the deepest task to task 0."""
    h, i = 0, num_tasks - 1
    while i > 0:
        i = (i - 1) // f
        h += 1
    return h


def chunk_bounds(n, num_tasks):
    """``P + 1`` offsets splitting ``n`` values into ``P`` near-equal chunks (the first
    ``n % P`` one longer), as ``numpy.array_split`` does."""
    q, r = divmod(int(n), int(num_tasks))
    sizes = [q + (1 if c < r else 0) for c in range(num_tasks)]
    return np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist()


def ring_send_chunk(i, step, num_tasks):
    """The chunk task ``i`` sends to ``i + 1`` at ``step`` (0 .. P-2) of the
    reduce-scatter (and of the all-gather); it receives chunk ``i - step - 1``."""
    return (i - step) % num_tasks


def ring_final_chunk(i, num_tasks):
    """The chunk whose total task ``i`` holds after the reduce-scatter."""
    return (i + 1) % num_tasks


# ----------------------------------------------------------------- messages of sums

def sums_bytes(codec, n):
    """A whole ``[loss, weight, grad (n)]`` message."""
    return _HEAD + codec.nbytes(n)


def chunk_bytes(codec, lo, hi):
    """A ring message of the sums' chunk ``[lo, hi)`` of the gradient (chunk 0, the one
    that starts at 0, carries the loss and weight sums too)."""
    return (_HEAD if lo == 0 else 0) + codec.nbytes(hi - lo)


def pack_exact(sums):
    """Exact sums ``[loss, weight, grad]`` as sent: the float64 vector itself, or -- when
    fewer than half the gradient's values are non-zero (a task whose rows touch a small
    share of a wide sparse space) -- its two leading sums, then the non-zeros' positions
    (int64, ascending) and their values (float64): 16 bytes a non-zero instead of 8 a
    value, so always fewer bytes. :func:`unpack_sums` tells the two apart by size."""
    sums = np.ascontiguousarray(sums, dtype="<f8")
    grad = sums[2:]
    nz = np.flatnonzero(grad)
    if 2 * nz.size >= grad.size:
        return sums
    return sums[:2].tobytes() + nz.astype("<i8").tobytes() + grad[nz].tobytes()


def exact_size_ok(size, n):
    """Whether ``size`` bytes can be an exact message of ``n`` gradient values: dense,
    or sparse (:func:`pack_exact`: fewer than n / 2 non-zeros)."""
    if size == _HEAD + 8 * n:
        return True
    k, rest = divmod(size - _HEAD, 16)
    return size >= _HEAD and rest == 0 and 2 * k < n


def _unpack_sparse(data, n):
    k = (len(data) - _HEAD) // 16
    if (len(data) - _HEAD) % 16 or 2 * k >= n:
        raise codecs.CodecError(f"{len(data)} bytes of exact sums for {n} values")
    idx = np.frombuffer(data[_HEAD:_HEAD + 8 * k], dtype="<i8")
    if k and (idx[0] < 0 or idx[-1] >= n or np.any(np.diff(idx) <= 0)):
        raise codecs.CodecError("sparse sums whose positions are not ascending in range")
    out = np.zeros(2 + n)
    out[:2] = np.frombuffer(data[:_HEAD], dtype="<f8")
    out[2 + idx] = np.frombuffer(data[_HEAD + 8 * k:], dtype="<f8")
    return out


def pack_sums(head, grad, codec, residual=None, seed=(0,)):
    """``head`` (2 float64, or None for a chunk without it) and ``grad`` encoded ->
    (bytes, new residual)."""
    data, residual = codecs.encode(codec, grad, residual, seed=seed)
    if head is None:
        return data, residual
    return np.ascontiguousarray(head, dtype="<f8").tobytes() + data, residual


def unpack_sums(data, codec, n, with_head=True):
    """-> float64 ``[loss, weight, grad]`` (``with_head``) or ``grad``; CodecError when
    the bytes are not such a message."""
    data = memoryview(data).cast("B")
    if not with_head:
        return codecs.decode(codec, data, n)
    if not codec.lossy and len(data) != _HEAD + 8 * n:
        return _unpack_sparse(data, n)          # exact sums, sent sparse (pack_exact)
    if len(data) < _HEAD:
        raise codecs.CodecError(f"{len(data)} bytes where the sums' head was due")
    head = np.frombuffer(data[:_HEAD], dtype="<f8")
    return np.concatenate([head, codecs.decode(codec, data[_HEAD:], n)])


# ----------------------------------------------------------------- theta

def theta_bytes(codec, n, delta):
    return 1 + (codec.nbytes(n) if delta else 8 * n)


def full_theta(theta):
    """A THETA_FULL message as buffers to send in order (theta itself, not a copy):
    what :func:`pack_theta` encodes when nothing is held, for a hub that frames it."""
    return [_KIND.pack(THETA_FULL), np.ascontiguousarray(theta, dtype="<f8")]


def pack_theta(theta, held, codec, seed=(0,)):
    """The driver's message for ``theta`` to tasks that hold ``held`` (None: they hold
    nothing, or the codec is exact) -> (bytes, what the tasks will hold)."""
    theta = np.ascontiguousarray(theta, dtype="<f8")
    if held is None or not codec.lossy:
        return _KIND.pack(THETA_FULL) + theta.tobytes(), theta.copy()
    data, _ = codecs.encode(codec, theta - held, None, seed=seed)
    return _KIND.pack(THETA_DELTA) + data, held + codecs.decode(codec, data, theta.size)


def apply_theta(data, held, codec, n):
    """A task applies a theta message -> the theta it now holds (float64, ``n``);
    CodecError when the bytes are not such a message (or a difference arrives where
    nothing is held)."""
    data = memoryview(data).cast("B")
    if len(data) < 1:
        raise codecs.CodecError("an empty theta message")
    kind = data[0]
    if kind == THETA_FULL:
        if len(data) != 1 + 8 * n:
            raise codecs.CodecError(f"theta: {len(data) - 1} bytes for {n} values")
        return np.frombuffer(data[1:], dtype="<f8").copy()
    if kind == THETA_DELTA and held is not None and held.size == n:
        return held + codecs.decode(codec, data[1:], n)
    raise codecs.CodecError(f"theta message of kind {kind} where this task holds "
                            f"{'nothing' if held is None else held.size}")


# ----------------------------------------------------------------- bytes per pass

def pass_bytes(topology, num_tasks, n, codec=codecs.NONE, depth=2, delta=None):
    """Payload bytes of one pass -> ``{"driver_out", "driver_in", "peers"}``:
    theta out of the driver, sums into it, and everything between tasks.

    ``delta``: theta sent as a difference (default: whenever the codec is lossy; the
    first pass, and the first after a task joins, sends it in full)."""
    p = int(num_tasks)
    delta = codec.lossy if delta is None else bool(delta)
    if topology == "star":
        return {"driver_out": p * theta_bytes(codec, n, delta),
                "driver_in": p * sums_bytes(codec, n), "peers": 0}
    if topology == "tree":
        return {"driver_out": theta_bytes(codec, n, delta),
                "driver_in": sums_bytes(codec, n),
                "peers": (p - 1) * (theta_bytes(codec, n, delta) + sums_bytes(codec, n))}
    if topology == "ring":
        b = chunk_bounds(n, p)
        theta = sum(theta_bytes(codec, b[c + 1] - b[c], delta) for c in range(p))
        sums = sum(chunk_bytes(codec, b[c], b[c + 1]) for c in range(p))
        return {"driver_out": theta, "driver_in": sums, "peers": (p - 1) * (theta + sums)}
    raise ValueError(f"unknown topology {topology!r}; expected one of {TOPOLOGIES}")
