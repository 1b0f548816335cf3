"""Reading ``.npy`` arrays someone else wrote: the header is checked (dtype float64,
the shape the reader expects, a size it allows) before a byte of data is allocated;
``allow_pickle`` is never on. Saved models and checkpoints are untrusted input."""
from __future__ import annotations

import io
import zipfile

import numpy as np


class BadArray(ValueError):
    """A ``.npy`` (or ``.npz`` member) that is not the array the reader expects."""


def _header(f):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f, max_header_size=10000)
    if version in ((2, 0), (3, 0)):
        return np.lib.format.read_array_header_2_0(f, max_header_size=10000)
    raise BadArray(f"an .npy format {version}")


def read(f, shape=None, max_values=1 << 31, what="array"):
    """A float64 array from the open binary file ``f``: ``shape`` (a tuple, ``None``
    entries free, or a callable that says whether a shape is right) is checked
    against the header first, and so is ``max_values``."""
    try:
        got, fortran, dtype = _header(f)
    except (ValueError, EOFError) as e:
        raise BadArray(f"{what}: not an .npy array ({e})") from None
    if dtype.kind != "f" or dtype.itemsize != 8 or dtype.hasobject:
        raise BadArray(f"{what}: dtype {dtype}, not float64")
    size = int(np.prod(got, dtype=object)) if got else 1
    if size > max_values:
        raise BadArray(f"{what}: {size} values claimed (at most {max_values})")
    if shape is not None:
        ok = shape(got) if callable(shape) else (
            len(got) == len(shape) and all(s is None or s == g for s, g in zip(shape, got)))
        if not ok:
            raise BadArray(f"{what}: shape {got}, expected {shape if not callable(shape) else 'another'}")
    data = f.read(8 * size)
    if len(data) != 8 * size:
        raise BadArray(f"{what}: {len(data)} bytes of data for {size} values")
    a = np.frombuffer(data, dtype=dtype).astype("<f8", copy=False)
    return a.reshape(got, order="F" if fortran else "C").copy()


def read_bytes(data, shape=None, max_values=1 << 31, what="array"):
    return read(io.BytesIO(data), shape, max_values, what)


def read_npz(path, shapes, what="arrays"):
    """The members of ``shapes`` (name -> shape) present in the ``.npz`` at ``path``;
    any other member is refused, unread (nothing is loaded that is not expected)."""
    try:
        z = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise BadArray(f"{what}: {e}") from None
    with z:
        names = z.namelist()
        unknown = sorted(n for n in names if n[:-4] not in shapes or not n.endswith(".npy"))
        if unknown:
            raise BadArray(f"{what}: unexpected members {unknown[:3]}")
        out = {}
        for name in names:
            key = name[:-4]
            info = z.getinfo(name)
            shape = shapes[key]
            size = int(np.prod([s for s in shape if s is not None], dtype=object)) \
                if shape and not callable(shape) else None
            if size is not None and info.file_size > 8 * size + 10000:
                raise BadArray(f"{what}: member {key} holds {info.file_size} bytes")
            with z.open(name) as f:
                out[key] = read(f, shape, what=f"{what} {key}")
    return out
