"""DataFrame / Parquet -> per-partition NumPy blocks, through Arrow.

Two halves:

* **Driver side** (:func:`resolve_input`): check the schema and decide how each
  column is read. Errors say which column and what was expected.
* **Executor side** (:func:`arrow_to_xyw`): an Arrow record batch -> ``(X, y, w)``
  with X a C-contiguous float64 array (or a CSR matrix when the vectors are
  sparse), y and w float64 (w None when no weight column). No ``Row`` objects,
  no per-row Python.

:func:`build_blocks` ties them together on Spark: under ``mapInArrow`` each
partition's batches become blocks in the store :mod:`sparkgd.blockstore`
provides (memory-mapped files on executors by default; pickled in Spark's cache
with ``store="memory"``), once per fit. Problems found on executors (nulls,
NaN, ragged arrays) travel back in the block's ``info`` and become one
:class:`~sparkgd.errors.SparkgdError` on the driver, never a stack trace.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .errors import SparkgdError

#: Largest X a single block holds, in bytes; a partition gives several blocks
#: beyond that (Arrow binary values are limited to 2 GiB, and smaller blocks
#: keep the decode copy small).
BLOCK_BYTES = 64 << 20

# Vectors denser than this become a dense block; sparser ones stay CSR.
_DENSE_ABOVE = 0.3


@dataclass(frozen=True)
class InputSpec:
    """How the driver asked executors to read the projected columns.

    The projection has the feature column(s) first, then ``label``, then
    ``weight`` when there is one, all under fixed names.
    """

    kind: str  # "array" | "vector" | "columns" | "libsvm" (text lines, label in the line)
    features: tuple  # original column name(s), for messages
    label: str
    weight: str | None
    num_features: int | None = None  # libsvm: the width given (else the largest index)

    @property
    def feature_desc(self):
        if self.kind == "libsvm":
            return "LIBSVM data"
        if self.kind == "columns":
            return "feature columns " + ",".join(self.features)
        return f"column '{self.features[0]}'"


# ----------------------------------------------------------------------------
# Driver side: schema checks and the projection.
# ----------------------------------------------------------------------------


def _is_numeric(dtype):
    from pyspark.sql.types import NumericType

    return isinstance(dtype, NumericType)


def _type_name(dtype):
    try:
        return dtype.simpleString()
    except Exception:  # pragma: no cover
        return str(dtype)


def _field(schema, name, role, source):
    names = schema.fieldNames()
    if name not in names:
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise SparkgdError(f"{role} column '{name}' not found in {source} (columns: {shown})")
    return schema[name]


def resolve_input(schema, features_col="features", feature_cols=None, label_col="label",
                  weight_col=None, source="the DataFrame"):
    """Check the columns a fit needs; return an :class:`InputSpec`."""
    from pyspark.ml.linalg import VectorUDT
    from pyspark.sql.types import ArrayType, DoubleType, FloatType

    if feature_cols:
        for c in feature_cols:
            f = _field(schema, c, "feature", source)
            if not _is_numeric(f.dataType):
                raise SparkgdError(
                    f"feature column '{c}' in {source} has type {_type_name(f.dataType)}; "
                    "expected a numeric type")
        kind, features = "columns", tuple(feature_cols)
    else:
        f = _field(schema, features_col, "features", source)
        t = f.dataType
        libsvm = (f.metadata or {}).get(LIBSVM_METADATA)
        if libsvm is not None:
            # text lines from read_libsvm: the label is in the line, there are no weights
            return InputSpec("libsvm", (features_col,), "label", None,
                             libsvm.get("numFeatures"))
        if isinstance(t, VectorUDT):
            kind = "vector"
        elif isinstance(t, ArrayType) and isinstance(t.elementType, (DoubleType, FloatType)):
            kind = "array"
        else:
            raise SparkgdError(
                f"features column '{features_col}' in {source} has type {_type_name(t)}; "
                "expected array<double>, array<float> or a Spark ML vector "
                "(or name numeric columns with --feature-cols)")
        features = (features_col,)
    for role, name in (("label", label_col), ("weight", weight_col)):
        if name is None:
            continue
        f = _field(schema, name, role, source)
        if not _is_numeric(f.dataType):
            raise SparkgdError(
                f"{role} column '{name}' in {source} has type {_type_name(f.dataType)}; "
                "expected a numeric type")
    return InputSpec(kind, features, label_col, weight_col)


#: Dense vector columns up to this many features are converted to arrays in the
#: JVM (``vector_to_array``), which moves them to Arrow 2-5x faster than the
#: vector type's own row-by-row conversion. Sparse or wider vectors keep their
#: struct form and become CSR blocks.
VECTOR_AS_ARRAY_MAX = 4096


def _first_vector(df, name):
    """The first non-null vector of a column (None when there is none)."""
    from pyspark.sql import functions as F

    row = df.select(F.col(_quote(name))).where(F.col(_quote(name)).isNotNull()).head()
    return None if row is None else row[0]


def features_column(df, spec):
    """-> (Column, executor kind): the features as executors read them."""
    from pyspark.sql import functions as F

    if spec.kind == "columns":
        return F.array(*[F.col(_quote(c)).cast("double") for c in spec.features]), "array"
    col = F.col(_quote(spec.features[0]))
    if spec.kind == "array":
        return col.cast("array<double>"), "array"
    from pyspark.ml.linalg import DenseVector

    first = _first_vector(df, spec.features[0])
    if isinstance(first, DenseVector) and first.size <= VECTOR_AS_ARRAY_MAX:
        from pyspark.ml.functions import vector_to_array

        return vector_to_array(col, "float64"), "array"
    return col, "vector"


def project(df, spec):
    """The columns executors read, and the spec they read them with.

    Numeric feature columns stay separate columns (cheapest to move); array and
    narrow vector columns arrive as ``array<double>``; wide vectors as the
    vector struct (dense or sparse rows).
    """
    from dataclasses import replace

    from pyspark.sql import functions as F

    if spec.kind == "libsvm":
        return df.select(F.col(_quote(spec.features[0])).alias("features"),
                         F.col(LIBSVM_FILE), F.col(LIBSVM_START)), spec
    if spec.kind == "columns":
        cols = [F.col(_quote(c)).cast("double").alias(f"f{i}")
                for i, c in enumerate(spec.features)]
        read_spec = spec
    else:
        col, kind = features_column(df, spec)
        cols = [col.alias("features")]
        read_spec = replace(spec, kind=kind)
    cols.append(F.col(_quote(spec.label)).cast("double").alias("label"))
    if spec.weight is not None:
        cols.append(F.col(_quote(spec.weight)).cast("double").alias("weight"))
    return df.select(*cols), read_spec


def _quote(name):
    return "`" + name.replace("`", "``") + "`"


#: The column metadata key that marks the text column of :func:`read_libsvm`.
LIBSVM_METADATA = "sparkgd.libsvm"
LIBSVM_FILE, LIBSVM_START = "_sparkgd_file", "_sparkgd_start"


def read_libsvm(spark, path, num_features=None, features_col="features"):
    """LIBSVM text as a DataFrame the estimators read: one row per line (the text column
    ``features_col``, marked in its metadata, plus the file and split it came from).

    Nothing is parsed here, and no pass counts the features: the tasks that build the
    blocks parse the lines with :mod:`sparkgd.libsvm` (Arrow and NumPy, no JVM vectors),
    and the width is the largest index found (or ``num_features``). Spark's own
    ``format("libsvm")`` builds a vector object per row in the JVM (~820 bytes per
    non-zero) and needs a counting pass without ``numFeatures``."""
    from pyspark.sql import functions as F

    if num_features is not None and int(num_features) < 1:
        raise SparkgdError(f"numFeatures must be >= 1 (got {num_features})")
    meta = {LIBSVM_METADATA: {"numFeatures": None if num_features is None
                              else int(num_features)}}
    text = spark.read.text(path)
    return text.select(F.col("value").alias(features_col, metadata=meta),
                       F.col("_metadata.file_path").alias(LIBSVM_FILE),
                       F.col("_metadata.file_block_start").alias(LIBSVM_START))


# ----------------------------------------------------------------------------
# Executor side: Arrow -> NumPy. Pure functions; testable without Spark.
# ----------------------------------------------------------------------------


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
        from .kernels import widen

        d = max(X.shape[1] for X in Xs)   # LIBSVM pieces are as wide as their largest index
        X = sp.vstack([widen(sp.csr_matrix(X), d) for X in Xs], format="csr")
    else:
        X = np.ascontiguousarray(np.vstack(Xs))
    y = np.concatenate([p[1] for p in parts])
    w = None if parts[0][2] is None else np.concatenate([p[2] for p in parts])
    return X, y, w


def block_key(info):
    """A block's identity that survives recomputation: (partition, position in it, rows)."""
    return int(info["part"]), int(info["seq"]), int(info["n"])


def block_info(X, y, w, moments=True):
    """Small per-block facts the driver checks: sizes, label range, weight sum (and,
    with ``moments``, the feature moments up to :data:`MAX_MOMENT_FEATURES`)."""
    n = int(y.shape[0])
    return {
        "n": n,
        "d": int(X.shape[1]),
        "wsum": float(n if w is None else w.sum()),
        "ymin": float(y.min()) if n else None,
        "ymax": float(y.max()) if n else None,
        "yint": bool(np.all(y == np.round(y))) if n else True,
        "nnz": int(X.nnz) if sp.issparse(X) else int(X.size),
        "yw": label_weights(y, w),
        "moments": _moments(X, w) if moments else None,
    }


#: Blocks with at most this many features carry their feature moments in their facts
#: (computed while the batch is in memory), so a fit needs no pass to get them. The facts
#: of every block go to the driver as JSON: 1026 numbers (about 20 KB) per block here.
MAX_MOMENT_FEATURES = 512


def _moments(X, w):
    from .stats import block_moments

    d = X.shape[1]
    return block_moments(X, w, d).tolist() if d <= MAX_MOMENT_FEATURES else None


#: Labels up to this value get a weighted histogram in the block facts (Spark ML's
#: label summary): it sets the starting intercepts of a classifier.
MAX_HISTOGRAM_LABEL = 1000


def label_weights(y, w):
    """Weighted count of each label 0, 1, ..., max(y) -- or None when the labels are
    not small non-negative integers."""
    if y.shape[0] == 0:
        return []
    lo, hi = float(y.min()), float(y.max())
    if lo < 0 or hi >= MAX_HISTOGRAM_LABEL or not np.all(y == np.round(y)):
        return None
    return np.bincount(y.astype(np.int64), weights=w, minlength=int(hi) + 1).tolist()


def merge_label_weights(a, b):
    if a is None or b is None:
        return None
    if len(a) < len(b):
        a, b = b, a
    return [x + (b[i] if i < len(b) else 0.0) for i, x in enumerate(a)]


# ----------------------------------------------------------------------------
# Blocks on the wire: a block is one Arrow row of raw little-endian bytes.
# ----------------------------------------------------------------------------

ENCODED_SCHEMA = ("info string, fmt string, n long, d long, X binary, indptr binary, "
                  "indices binary, y binary, w binary")


def _row_chunks(X, y, w, max_bytes):
    n, d = X.shape
    if sp.issparse(X):
        per_row = 12.0 * X.nnz / max(n, 1) + 8
    else:
        per_row = 8.0 * max(d, 1)
    step = max(1, int(max_bytes // per_row))
    for start in range(0, n, step):
        stop = min(n, start + step)
        yield X[start:stop], y[start:stop], None if w is None else w[start:stop]


def encode_partition(batches, spec, max_bytes=BLOCK_BYTES):
    """mapInArrow body: Arrow batches of one partition -> encoded block rows.

    Emits nothing for an empty partition, and a single row with ``fmt='error'``
    (and the message in ``info``) when the partition holds bad data.
    """
    import pyarrow as pa

    def row(info, fmt="", n=0, d=0, X=b"", indptr=b"", indices=b"", y=b"", w=b""):
        return pa.RecordBatch.from_pydict({
            "info": [json.dumps(info)], "fmt": [fmt], "n": [n], "d": [d],
            "X": [X], "indptr": [indptr], "indices": [indices], "y": [y], "w": [w],
        }, schema=_encoded_arrow_schema())

    parts = []
    try:
        parts.extend(xyw_batches(batches, spec))
        if not parts:
            return
        X, y, w = concat_xyw(parts)
    except BadInput as e:
        yield row({"error": str(e)}, fmt="error")
        return
    del parts
    for Xc, yc, wc in _row_chunks(X, y, w, max_bytes):
        info = block_info(Xc, yc, wc)
        wbytes = b"" if wc is None else wc.tobytes()
        if sp.issparse(Xc):
            yield row(info, "csr", Xc.shape[0], Xc.shape[1], Xc.data.tobytes(),
                      Xc.indptr.astype(np.int64).tobytes(), Xc.indices.astype(np.int32).tobytes()
                      if Xc.shape[1] < 2**31 else Xc.indices.astype(np.int64).tobytes(),
                      yc.tobytes(), wbytes)
        else:
            yield row(info, "dense", Xc.shape[0], Xc.shape[1],
                      np.ascontiguousarray(Xc).tobytes(), b"", b"", yc.tobytes(), wbytes)


def _encoded_arrow_schema():
    import pyarrow as pa

    return pa.schema([("info", pa.string()), ("fmt", pa.string()), ("n", pa.int64()),
                      ("d", pa.int64()), ("X", pa.binary()), ("indptr", pa.binary()),
                      ("indices", pa.binary()), ("y", pa.binary()), ("w", pa.binary())])


def decode_row(row):
    """An encoded row (a pyspark Row or a dict) -> (info dict, (X, y, w) or None)."""
    info = json.loads(row["info"])
    fmt = row["fmt"]
    if fmt == "error":
        return info, None
    n, d = int(row["n"]), int(row["d"])
    y = np.frombuffer(row["y"], dtype=np.float64)
    w = np.frombuffer(row["w"], dtype=np.float64) if len(row["w"]) else None
    data = np.frombuffer(row["X"], dtype=np.float64)
    if fmt == "dense":
        X = data.reshape(n, d)
    else:
        indptr = np.frombuffer(row["indptr"], dtype=np.int64)
        idx_dtype = np.int32 if d < 2**31 else np.int64
        indices = np.frombuffer(row["indices"], dtype=idx_dtype)
        X = sp.csr_matrix((data, indices, indptr), shape=(n, d))
    return info, (X, y, w)


# ----------------------------------------------------------------------------
# On Spark: the cached blocks of one fit.
# ----------------------------------------------------------------------------


class Blocks:
    """The cached blocks of one fit, plus the facts about them.

    ``run(job)`` runs ``job(rdd)`` where ``rdd`` yields (X, y, w) blocks; the
    store behind it (:mod:`sparkgd.blockstore`) decides where they live and
    recovers them if they are lost. (The served store has no RDD of blocks: its
    tasks hold them and :class:`~sparkgd.modes.sync.DistributedObjective` talks to
    them; its facts carry everything else a fit needs.) Use as a context manager (or call
    :meth:`release`) so everything is freed when the fit ends, whatever the outcome.
    """

    def __init__(self, store, infos, spec):
        self.store = store
        self.infos = infos
        self.spec = spec
        self.num_rows = sum(i["n"] for i in infos)
        self.num_features = max(i["d"] for i in infos) if infos else 0
        self.num_partitions = store.num_partitions  # of the data, as read or repartitioned
        # per pass (the file store and the served store coalesce)
        self.num_tasks = getattr(store, "num_tasks", None) or store.rdd.getNumPartitions()
        self.threads_per_task = getattr(store, "threads_per_task", 1)
        self._closers = []

    @property
    def rdd(self):
        return self.store.rdd

    def run(self, job, serving=False):
        return self.store.run(job, serving=serving)

    @property
    def task_keys(self):
        """Per task of a pass: the keys of the blocks it must hold (sorted)."""
        return self.store.task_keys

    @property
    def certified(self):
        """False when the passes cannot be vouched for and the fit must start over
        (only the served store, after a lost task; see ``ServedBlocks``)."""
        return getattr(self.store, "certified", True)

    def label_weights(self):
        """Weighted count of each class label 0, 1, ... (None if labels are not such)."""
        out = []
        for i in self.infos:
            out = merge_label_weights(out, i.get("yw"))
        return None if out is None else np.asarray(out, dtype=np.float64)

    def label_range(self):
        lo = min(i["ymin"] for i in self.infos)
        hi = max(i["ymax"] for i in self.infos)
        return lo, hi, all(i["yint"] for i in self.infos)

    def on_release(self, fn):
        """Call ``fn()`` first when the blocks are released (e.g. stop serving tasks)."""
        self._closers.append(fn)

    def release(self):
        closers, self._closers = self._closers, []
        try:
            for fn in reversed(closers):
                fn()
        finally:
            self.store.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _stamp(part, pairs):
    """Give each block of data partition ``part`` its identity (see :func:`block_key`).

    Stamped here, by the RDD's own partition index, not from the task context: a
    coalesced task computes several partitions, and its context names only its own."""
    seq = 0
    for info, block in pairs:
        if block is not None:
            info = dict(info, part=part, seq=seq)
            seq += 1
        yield info, block


def _parse_handles(part, rows):
    return _stamp(part, ((json.loads(r["info"]), json.loads(r["handle"])) for r in rows))


def _decode_partition(part, rows):
    return _stamp(part, (decode_row(r) for r in rows))


#: How dense features may be stored (``dtype``); sums are float64 either way.
DTYPES = ("float64", "float32")


#: Block stores build_blocks knows; ``auto`` is ``served`` unless executors come and go.
STORES = ("auto", "served", "files", "memory")


def build_blocks(df, spec, num_partitions=None, source="the DataFrame", store="files",
                 dtype="float64", wait_seconds=None):
    """Project, convert through Arrow and cache; check what executors found.

    ``store``: ``files`` (memory-mapped block files on executors, the default),
    ``served`` (the blocks, dense or CSR, stay in the memory of the tasks that serve
    the passes, see :class:`~sparkgd.blockstore.ServedBlocks`), ``auto`` (``served``
    unless dynamic allocation is on, else ``files``) or ``memory`` (pickled blocks in
    Spark's cache, float64 only). ``dtype``: how dense features are
    kept (see :data:`DTYPES`).

    Returns :class:`Blocks`. Raises SparkgdError (after releasing the cache)
    when a partition holds bad data or the input is empty.
    """
    import uuid

    from .blockstore import FileBlocks, MemoryBlocks, ServedBlocks, task_cpus, task_slots, \
        write_arrow_partition
    from .workers import TaskLost, WorkersUnavailable

    if store not in STORES:
        raise ValueError(f"unknown block store {store!r}; expected one of {STORES}")
    if dtype not in DTYPES or (store == "memory" and dtype != "float64"):
        raise ValueError(f"dtype {dtype!r} is not available for the {store} store")

    try:
        proj, spec = project(df, spec)
    except Exception as e:
        text = str(e).strip()
        raise SparkgdError(f"cannot read {source}: "
                           f"{text.splitlines()[0] if text else type(e).__name__}") from None
    if num_partitions:
        proj = proj.repartition(int(num_partitions))
    sc = proj.sparkSession.sparkContext
    if store == "auto":
        # served needs every task running at once: not with executors coming and going
        dynamic = sc.getConf().get("spark.dynamicAllocation.enabled",
                                   "false").strip().lower() == "true"
        store = "files" if dynamic else "served"
    if store == "served":
        frame = proj.coalesce(task_slots(sc))   # no-op with fewer partitions than slots
        backend = ServedBlocks(frame, spec, dtype, num_partitions, wait_seconds,
                               threads=task_cpus(sc))
    elif store == "files":
        fit_id = uuid.uuid4().hex[:16]
        rows = proj.mapInArrow(
            lambda it, _s=spec, _t=dtype: write_arrow_partition(it, _s, fit_id, _t),
            "info string, handle string")
        backend = FileBlocks(rows.rdd.mapPartitionsWithIndex(_parse_handles), fit_id)
    elif store == "memory":
        encoded = proj.mapInArrow(lambda it, _s=spec: encode_partition(it, _s), ENCODED_SCHEMA)
        backend = MemoryBlocks(encoded.rdd.mapPartitionsWithIndex(_decode_partition))
    try:
        try:
            infos = backend.materialize()
        except (TaskLost, WorkersUnavailable):  # the caller starts over / uses files
            raise
        except Exception as e:  # e.g. a corrupt file, or a cast Spark cannot make
            text = str(e).strip()
            first = text.splitlines()[0] if text else type(e).__name__
            raise SparkgdError(f"cannot read {source}: {first}") from None
        errors = [i["error"] for i in infos if "error" in i]
        if errors:
            raise SparkgdError(f"bad input in {source}: {errors[0]}")
        if not infos or sum(i["n"] for i in infos) == 0:
            raise SparkgdError(f"no rows in {source}")
        dims = sorted({i["d"] for i in infos})
        if len(dims) > 1 and spec.kind != "libsvm":   # LIBSVM: the largest index decides
            raise SparkgdError(
                f"{spec.feature_desc} in {source}: rows have different lengths "
                f"({', '.join(map(str, dims[:5]))})")
        if spec.weight is not None and sum(i["wsum"] for i in infos) <= 0:
            raise SparkgdError(f"weight column '{spec.weight}' in {source} sums to 0")
    except BaseException:
        backend.release()
        raise
    return Blocks(backend, infos, spec)
