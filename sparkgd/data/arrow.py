"""Executor side of reading input: Arrow record batches -> ``(X, y, w)`` NumPy blocks.

Pure functions, testable without Spark. :func:`xyw_batches` is the one loop every
store reads its partition with: each batch becomes X (C-contiguous float64, or CSR
when the vectors are sparse or the input is LIBSVM text), y and w float64 (w None
without a weight column). No ``Row`` objects, no per-row Python. Bad values (nulls,
NaN, ragged arrays, a malformed LIBSVM line) raise :class:`BadInput`, whose message
the driver reports as one :class:`~sparkgd.errors.SparkgdError`.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

# Vectors denser than this become a dense block; sparser ones stay CSR.
_DENSE_ABOVE = 0.3


class BadInput(Exception):
    """Raised inside a partition; becomes a SparkgdError on the driver."""


def _float_column(arr, what):
    """Arrow numeric array without nulls -> float64 NumPy array."""
    import pyarrow as pa

    if arr.null_count:
        raise BadInput(f"{what} has {arr.null_count} null value(s)")
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    out = arr.to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(out, dtype=np.float64)


def _list_values(arr, what):
    """A list<double> array without null rows -> (flat values, per-row lengths)."""
    if arr.null_count:
        raise BadInput(f"{what} has {arr.null_count} null row(s)")
    offsets = arr.offsets.to_numpy()
    flat = arr.flatten()  # honours the array's slice offset
    if flat.null_count:
        raise BadInput(f"{what} has null elements inside a vector")
    values = flat.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    return values, np.diff(offsets)


def _dense_from_lists(arr, what):
    values, lengths = _list_values(arr, what)
    n = len(lengths)
    if n == 0:
        return np.zeros((0, 0))
    d = int(lengths[0])
    if np.any(lengths != d):
        bad = int(np.flatnonzero(lengths != d)[0])
        raise BadInput(f"{what}: row {bad} has {int(lengths[bad])} elements but row 0 has {d}")
    return np.ascontiguousarray(values.reshape(n, d))


def _from_vectors(arr, what):
    """Spark ML VectorUDT (struct<type, size, indices, values>) -> dense or CSR."""
    import pyarrow as pa

    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if arr.null_count:
        raise BadInput(f"{what} has {arr.null_count} null row(s)")
    kinds = arr.field("type").to_numpy(zero_copy_only=False)
    is_sparse = kinds == 0
    values, counts = _list_values(arr.field("values"), what)
    n = len(counts)
    if n == 0:
        return np.zeros((0, 0))
    if not is_sparse.any():
        return _dense_from_lists(arr.field("values"), what)
    sizes = arr.field("size").fill_null(-1).to_numpy(zero_copy_only=False)
    # A dense row's size is its number of values; a sparse row states it.
    sizes = np.where(is_sparse, sizes, counts)
    d = int(sizes[0])
    if np.any(sizes != d):
        bad = int(np.flatnonzero(sizes != d)[0])
        raise BadInput(f"{what}: row {bad} has size {int(sizes[bad])} but row 0 has {d}")
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    nnz = int(indptr[-1])
    indices = np.empty(nnz, dtype=np.int64)
    sparse_pos = np.repeat(is_sparse, counts)
    idx_arr = arr.field("indices")
    sparse_rows = idx_arr.filter(pa.array(is_sparse))
    flat_idx = sparse_rows.flatten().to_numpy(zero_copy_only=False)
    if flat_idx.shape[0] != int(sparse_pos.sum()):
        raise BadInput(f"{what}: sparse vectors with different numbers of indices and values")
    indices[sparse_pos] = flat_idx
    dense_pos = ~sparse_pos
    if dense_pos.any():
        within = np.arange(nnz) - np.repeat(indptr[:-1], counts)
        indices[dense_pos] = within[dense_pos]
    if nnz and (indices.min() < 0 or indices.max() >= d):
        raise BadInput(f"{what}: a sparse vector has an index outside [0, {d})")
    if d and nnz >= _DENSE_ABOVE * n * d:
        X = np.zeros((n, d))
        rows = np.repeat(np.arange(n), counts)
        X[rows, indices] = values
        return X
    index_dtype = np.int32 if d < 2**31 and nnz < 2**31 else np.int64
    X = sp.csr_matrix((values, indices.astype(index_dtype), indptr.astype(index_dtype)),
                      shape=(n, d))
    X.sum_duplicates()  # also sorts indices; Spark vectors are sorted already
    return X


def features_from_arrow(arr, kind, what):
    """One Arrow features column (``kind`` "array" or "vector") -> X, dense or CSR."""
    import pyarrow as pa

    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if kind == "array":
        return _dense_from_lists(arr, what)
    return _from_vectors(arr, what)


def _lines_before(path, start):
    """Lines of a local file before the first line of the split that starts at byte
    ``start`` > 0 (None when the file cannot be read here)."""
    from urllib.parse import unquote, urlparse

    url = urlparse(path)
    if url.scheme not in ("", "file"):
        return None
    try:
        with open(unquote(url.path), "rb") as f:
            # Hadoop's line reader gives the line that holds byte ``start`` (or starts
            # there) to the split before: that line is not this split's either
            return f.read(start).count(b"\n") + 1
    except OSError:
        return None


class LibsvmReader:
    """Arrow batches of :func:`read_libsvm`'s projection -> (X CSR, y, None), in order.

    Keeps, per file split, how many lines it has seen, so a bad line is reported as
    ``file, line N`` (counted from the file's start where the file is readable here,
    else from the split's)."""

    def __init__(self, spec):
        self.spec = spec
        self.seen = {}

    def __call__(self, batch):
        from .libsvm import LibsvmError, parse_lines, to_csr

        lines, files, starts = batch.column(0), batch.column(1), batch.column(2)
        files = files.to_numpy(zero_copy_only=False)
        starts = starts.to_numpy(zero_copy_only=False)
        try:
            parsed = parse_lines(lines)
            width = self.spec.num_features or parsed.max_index + 1
            X = to_csr(parsed, width)
        except LibsvmError as e:
            raise BadInput(self._where(e.line, files, starts) + ": " + str(e)) from None
        n = len(files)
        # runs of lines from one split (a coalesced task reads several in turn)
        edges = np.flatnonzero((files[1:] != files[:-1]) | (starts[1:] != starts[:-1])) + 1
        bounds = np.concatenate([[0], edges, [n]])
        for a, b in zip(bounds[:-1], bounds[1:]):
            key = (str(files[a]), int(starts[a]))
            self.seen[key] = self.seen.get(key, 0) + int(b - a)
        return X, parsed.labels, None

    def _where(self, row, files, starts):
        key = (str(files[row]), int(starts[row]))
        same = (files[:row] == files[row]) & (starts[:row] == starts[row])
        at = self.seen.get(key, 0) + int(same.sum()) + 1
        if key[1] == 0:
            return f"{key[0]}, line {at}"
        prior = _lines_before(*key)
        if prior is None:
            return f"{key[0]}, line {at} of the part starting at byte {key[1]}"
        return f"{key[0]}, line {prior + at}"


def xyw_batches(batches, spec):
    """Arrow batches of the projection -> (X, y, w) per non-empty batch: the one loop
    every block store reads its input with."""
    convert = LibsvmReader(spec) if spec.kind == "libsvm" else \
        (lambda batch: arrow_to_xyw(batch, spec))
    for batch in batches:
        if batch.num_rows:
            yield convert(batch)


def arrow_to_xyw(batch, spec):
    """One Arrow record batch of the projection -> (X, y, w)."""
    nfeat = len(spec.features) if spec.kind == "columns" else 1
    if spec.kind == "columns":
        cols = [_float_column(batch.column(i), f"feature column '{c}'")
                for i, c in enumerate(spec.features)]
        X = np.ascontiguousarray(np.column_stack(cols)) if cols else np.zeros((batch.num_rows, 0))
    else:
        X = features_from_arrow(batch.column(0), spec.kind, spec.feature_desc)
    y = _float_column(batch.column(nfeat), f"label column '{spec.label}'")
    w = None
    if spec.weight is not None:
        w = _float_column(batch.column(nfeat + 1), f"weight column '{spec.weight}'")
    data = X.data if sp.issparse(X) else X
    if not np.all(np.isfinite(data)):
        raise BadInput(f"{spec.feature_desc} holds NaN or infinite values")
    if not np.all(np.isfinite(y)):
        raise BadInput(f"label column '{spec.label}' holds NaN or infinite values")
    if w is not None and (not np.all(np.isfinite(w)) or np.any(w < 0)):
        raise BadInput(f"weight column '{spec.weight}' holds negative, NaN or infinite values")
    return X, y, w


#: How dense features may be stored (``dtype``); sums are float64 either way.
DTYPES = ("float64", "float32")


def stored_dense(X, spec, dtype):
    """Dense X as a block keeps it: ``dtype`` float64 as is, float32 rounded (a value
    beyond float32's range is bad input)."""
    if dtype == "float64":
        return X
    X = X.astype(dtype)
    if not np.isfinite(X).all():
        raise BadInput(f"{spec.feature_desc} holds values beyond {dtype}'s range "
                       f"(|x| > {np.finfo(dtype).max:.3g}); use dtype float64")
    return X


def concat_xyw(parts):
    """Stack several (X, y, w) of one partition into one block."""
    if len(parts) == 1:
        return parts[0]
    Xs = [p[0] for p in parts]
    if any(sp.issparse(X) for X in Xs):
        from ..kernels import widen

        d = max(X.shape[1] for X in Xs)   # LIBSVM pieces are as wide as their largest index
        X = sp.vstack([widen(sp.csr_matrix(X), d) for X in Xs], format="csr")
    else:
        X = np.ascontiguousarray(np.vstack(Xs))
    y = np.concatenate([p[1] for p in parts])
    w = None if parts[0][2] is None else np.concatenate([p[2] for p in parts])
    return X, y, w


#: CSR batches of a serving task are stacked into blocks of up to this many non-zeros:
#: a pass then makes one gradient-sized vector per block, not one per Arrow batch (at
#: 10^6 features that vector is 8 MB), and the Arrow batches are freed.
CSR_BLOCK_NNZ = 1 << 24


def stack_csr(blocks, max_nnz=CSR_BLOCK_NNZ):
    """Consecutive CSR blocks ``(X, y, w)`` stacked into as few as ``max_nnz`` allows
    (dense blocks are kept as they are); the rows keep their order."""
    out, run, nnz = [], [], 0

    def flush():
        if run:
            X, y, w = concat_xyw(run)
            out.append((X.tocsr(), y, w))
            run.clear()

    for block in blocks:
        if not sp.issparse(block[0]):
            flush()
            nnz = 0
            out.append(block)
            continue
        if run and nnz + block[0].nnz > max_nnz:
            flush()
            nnz = 0
        run.append(block)
        nnz += block[0].nnz
    flush()
    return out


def localize(blocks, cols):
    """CSR ``blocks`` whose rows touch the sorted columns ``cols`` (all of them, and no
    other), re-indexed so that ``cols[j]`` is their column j: ``len(cols)`` wide, however
    wide the data's space (a hashed 2^28). Values are not copied; dense blocks are kept
    as they are. :func:`remap_columns` places them among a fit's columns later."""
    from ..stats import table_pays

    width = max([X.shape[1] for X, _y, _w in blocks if sp.issparse(X)] or [0])
    nnz = sum(X.nnz for X, _y, _w in blocks if sp.issparse(X))
    if table_pays(width, nnz):
        table = np.zeros(width, dtype=np.int64)     # a gather: O(width + non-zeros)
        table[cols] = np.arange(len(cols))
        return remap_columns(blocks, table, len(cols))
    return remap_columns(blocks, None, len(cols), lambda indices: np.searchsorted(
        cols, indices))


def remap_columns(blocks, positions, width, where=None):
    """CSR ``blocks`` re-indexed to ``width`` columns, column j at ``positions[j]``
    (increasing: each row's indices stay sorted); ``where(indices)``: the new indices
    instead. Values are not copied; dense blocks are kept as they are."""
    index_type = np.int32 if width < 2 ** 31 else np.int64
    out = []
    for X, y, w in blocks:
        if sp.issparse(X):
            new = where(X.indices) if where is not None else positions[X.indices]
            X = sp.csr_matrix((X.data, new.astype(index_type, copy=False), X.indptr),
                              shape=(X.shape[0], int(width)), copy=False)
        out.append((X, y, w))
    return out
