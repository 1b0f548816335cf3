"""Gradient codecs: what a task sends instead of its float64 partial gradient. Pure.

``compression`` names one (DESIGN.md section 2):

* ``none``: raw little-endian float64, 8 bytes a value;
* ``fp16``: one float64 scale (the largest magnitude) and every value over it as
  float16, 8 + 2 n bytes. Scaled, because partial gradients are *sums* over rows and
  overflow float16's 65504 on any sizeable partition; the error is at most 2^-11 of the
  largest value (below 2^-14 of it, float16's subnormals keep an absolute 2^-25);
* ``topk:<fraction>``: the ``ceil(fraction n)`` values of largest magnitude, as uint32
  indices (ascending) and float32 values, 4 + 8 k bytes, with **error feedback**: what a
  task did not send (the other values, and the float32 rounding of those it did) stays
  in its residual and is added to its next vector, so nothing is lost, only delayed;
* ``qsgd:<bits>``: the vector's 2-norm as float64, and every value as a signed level
  ``q`` in ``[-s, s]``, ``s = 2^(bits-1) - 1``, stored in ``bits <= 8``: int8, else
  int16; ``q`` rounds ``s |v_i| / norm`` up or down at random with the probabilities
  that make it unbiased (``E[decode] = v``), from a seeded generator, so a pass is
  reproducible.

:func:`encode` and :func:`decode` are plain functions of arrays and bytes; a decoder
checks every length and index before using it (its input comes off a network).
Totals are summed in float64 from decoded vectors.
"""
from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass

import numpy as np

_F64 = struct.Struct("<d")
_U32 = struct.Struct("<I")


class CodecError(ValueError):
    """Bytes that are not an encoding of a vector of the expected length."""


@dataclass(frozen=True)
class Codec:
    """One parsed ``compression`` value."""

    name: str                  # none | fp16 | topk | qsgd
    fraction: float = 1.0      # topk
    bits: int = 0              # qsgd

    @property
    def lossy(self):
        return self.name != "none"

    @property
    def error_feedback(self):
        """Whether the encoder keeps a residual (what it did not send) per task."""
        return self.name == "topk"

    def k(self, n):
        return min(n, max(1, math.ceil(self.fraction * n))) if n else 0

    @property
    def level_dtype(self):
        return np.dtype("<i1") if self.bits <= 8 else np.dtype("<i2")

    def nbytes(self, n):
        """Bytes the encoding of a vector of ``n`` values takes."""
        if self.name == "none":
            return 8 * n
        if self.name == "fp16":
            return 8 + 2 * n
        if self.name == "topk":
            return 4 + 8 * self.k(n)
        return 8 + self.level_dtype.itemsize * n

    def __str__(self):
        if self.name == "topk":
            return f"topk:{self.fraction!r}"   # exact: the tasks parse it back
        if self.name == "qsgd":
            return f"qsgd:{self.bits}"
        return self.name


NONE = Codec("none")


def parse(text):
    """``none``, ``fp16``, ``topk:<fraction in (0, 1]>``, ``qsgd:<bits in 2..16>`` ->
    :class:`Codec`; ValueError saying what is expected."""
    t = str(text).strip().lower()
    if t in ("none", "fp16"):
        return Codec(t)
    m = re.fullmatch(r"topk:([0-9.eE+-]+)", t)
    if m:
        try:
            f = float(m.group(1))
        except ValueError:
            f = float("nan")
        if not 0 < f <= 1:
            raise ValueError(f"compression topk:<fraction> needs a fraction in (0, 1], "
                             f"got {text!r}")
        return Codec("topk", fraction=f)
    m = re.fullmatch(r"qsgd:(\d+)", t)
    if m:
        bits = int(m.group(1))
        if not 2 <= bits <= 16:
            raise ValueError(f"compression qsgd:<bits> needs bits in 2..16, got {text!r}")
        return Codec("qsgd", bits=bits)
    raise ValueError(f"unknown compression {text!r}; expected none, fp16, topk:<fraction> "
                     "or qsgd:<bits>")


def encode(codec, v, residual=None, seed=(0,)):
    """-> (bytes, new residual or None). ``residual``: what this task has not sent yet
    (error-feedback codecs; None at the start); ``seed``: a tuple of non-negative ints
    that fixes qsgd's random rounding (say (fit seed, pass, task))."""
    v = np.asarray(v, dtype=np.float64)
    if codec.name == "none":
        return np.ascontiguousarray(v, dtype="<f8").tobytes(), None
    if codec.name == "fp16":
        scale = float(np.max(np.abs(v))) if v.size else 0.0
        if not math.isfinite(scale):
            raise CodecError("fp16: the vector holds non-finite values")
        half = (v / scale if scale > 0 else np.zeros_like(v)).astype("<f2")
        return _F64.pack(scale) + half.tobytes(), None
    if codec.name == "topk":
        u = v if residual is None else v + residual
        k = codec.k(u.size)
        idx = np.sort(np.argpartition(np.abs(u), u.size - k)[u.size - k:]) if k < u.size \
            else np.arange(u.size)
        values = u[idx].astype("<f4")
        new_residual = u.copy()
        new_residual[idx] -= values.astype(np.float64)   # the float32 rounding stays too
        return (_U32.pack(k) + idx.astype("<u4").tobytes() + values.tobytes(),
                new_residual)
    # qsgd
    s = (1 << (codec.bits - 1)) - 1
    norm = float(np.sqrt(v @ v)) if v.size else 0.0
    if not math.isfinite(norm):
        raise CodecError("qsgd: the vector holds non-finite values")
    if norm == 0.0:
        return _F64.pack(0.0) + np.zeros(v.size, codec.level_dtype).tobytes(), None
    level = np.abs(v) * (s / norm)
    low = np.floor(level)
    rng = np.random.default_rng([int(x) % (1 << 64) for x in seed] + [0x51534744])
    q = low + (rng.random(v.size) < (level - low))
    q = np.minimum(q, s) * np.sign(v)
    return _F64.pack(norm) + q.astype(codec.level_dtype).tobytes(), None


def decode(codec, data, n):
    """Bytes of :func:`encode` for a vector of ``n`` values -> float64 (n,); CodecError
    when the bytes are not such an encoding."""
    data = memoryview(data).cast("B")
    if len(data) != codec.nbytes(n) and codec.name != "topk":
        raise CodecError(f"{codec}: {len(data)} bytes for {n} values, expected "
                         f"{codec.nbytes(n)}")
    if codec.name == "none":
        return np.frombuffer(data, dtype="<f8").astype(np.float64)
    if codec.name == "fp16":
        (scale,) = _F64.unpack(data[:8])
        half = np.frombuffer(data[8:], dtype="<f2").astype(np.float64)
        if not math.isfinite(scale) or scale < 0 or not np.all(np.abs(half) <= 1.0):
            raise CodecError("fp16: a non-finite scale, or values beyond it")
        return half * scale
    if codec.name == "topk":
        if len(data) < 4:
            raise CodecError(f"{codec}: {len(data)} bytes")
        (k,) = _U32.unpack(data[:4])
        if k > n or len(data) != 4 + 8 * k:
            raise CodecError(f"{codec}: {k} values in {len(data)} bytes for {n}")
        idx = np.frombuffer(data[4:4 + 4 * k], dtype="<u4")
        if k and (idx[-1] >= n or np.any(idx[1:] <= idx[:-1])):
            raise CodecError(f"{codec}: indices not ascending within [0, {n})")
        values = np.frombuffer(data[4 + 4 * k:], dtype="<f4")
        if not np.all(np.isfinite(values)):
            raise CodecError(f"{codec}: non-finite values")
        out = np.zeros(n)
        out[idx] = values
        return out
    (norm,) = _F64.unpack(data[:8])
    s = (1 << (codec.bits - 1)) - 1
    q = np.frombuffer(data[8:], dtype=codec.level_dtype)
    if not math.isfinite(norm) or norm < 0 or (q.size and np.abs(q.astype(np.int32)).max() > s):
        raise CodecError(f"{codec}: a level outside [-{s}, {s}] or a bad norm")
    return q.astype(np.float64) * (norm / s)
