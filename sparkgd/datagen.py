"""Synthetic, partitioned data sets for sparkgd (NumPy + PyArrow only, no Spark).

    python -m sparkgd.datagen OUT --task binary --rows 1000000 --features 100 --partitions 8

writes ``OUT/part-00000.parquet`` ... ``OUT/part-00007.parquet``. Files are written one
row group at a time, so memory stays bounded whatever the size of the data set.

    python -m sparkgd.datagen OUT --format libsvm --rows 200k --features 1M --nnz-per-row 100

writes *sparse* data as LIBSVM text, ``OUT/part-00000.libsvm`` ... (see "LIBSVM" below;
:func:`write_libsvm`), for ``spark.read.format("libsvm")`` / ``--format libsvm``.

Model (fixed by ``seed``):

* coefficients ``beta ~ N(0, 1/d)``: shape ``(d,)``, or ``(K, d)`` for ``multiclass``
  (centred over the classes, since softmax only identifies differences);
* intercept ``0.5``; for ``multiclass`` the vector ``0.5 * linspace(-1, 1, K)``;
* ``X ~ N(0, I)``;
* ``regression``: ``y = X beta + b + 0.5 * N(0, 1)``;
* ``binary``: ``y ~ Bernoulli(sigmoid(X beta + b))``, as 0.0 / 1.0;
* ``multiclass``: ``y ~ Categorical(softmax(B x + b))``, as 0.0 ... K-1.

Every row group is drawn from its own generator
``np.random.default_rng([seed, file_index, chunk_index])``: the output is a pure function of
the arguments, whatever order the chunks are produced in. The ``weight`` column is drawn
last, so ``weights=True`` adds a column without changing ``features`` or ``label``.

The true model is also stored in each file's Arrow schema metadata under the key
``sparkgd.datagen`` (JSON), which Spark ignores.

LIBSVM (:func:`write_libsvm`, ``--format libsvm``): one line per row,

    label idx:val idx:val ...

* every row has exactly ``nnz_per_row`` (k) distinct indices, sorted ascending, **1-based**
  (``1 .. d``), uniformly distributed over the k-subsets of the features; values
  ``x ~ N(0, 1)`` on them, 0 elsewhere;
* ``beta ~ N(0, 1/k)`` on *all* d features (so ``x . beta`` has variance 1 whatever d),
  ``(K, d)`` and centred over the classes for ``multiclass``; intercepts as above;
  ``true_model(task, d, K, seed, nnz_per_row=k)`` returns them;
* labels as above: ``0`` / ``1`` (binary), ``0 .. K-1`` (multiclass), printed as integers;
  ``x . beta + b + 0.5 * N(0, 1)`` (regression);
* values (and regression labels) are printed in the shortest form that parses back to the
  same double (as Python's ``repr``), so Spark's reader and ``float()`` recover exactly
  the generated numbers.

Rows are split evenly over ``partitions`` files, ``OUT/part-NNNNN.libsvm``, each written
in chunks of at most ``LIBSVM_CHUNK_VALUES`` stored values (memory stays at a few hundred
MB whatever the size); chunk ``c`` of file ``f`` draws from
``np.random.default_rng([seed, f, c])``. ``OUT/_sparkgd_datagen.json`` records the
arguments (Spark skips files whose names start with ``_``). Read it back with
``spark.read.format("libsvm").option("numFeatures", d).load(OUT)`` (giving ``numFeatures``
saves Spark a pass over the data, and keeps d when the largest index happens to be
unused).

This module imports nothing from the rest of sparkgd and needs neither Spark nor SciPy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

__all__ = ["write_dataset", "write_libsvm", "write_hashed", "true_model", "main"]

TASKS = ("binary", "regression", "multiclass")
FORMATS = ("array", "columns")
#: ``--format`` choices of the command line: the Parquet layouts, and LIBSVM text.
CLI_FORMATS = FORMATS + ("libsvm",)

#: Upper bound on rows per row group.
MAX_CHUNK_ROWS = 200_000
#: Upper bound on feature values per row group (keeps a chunk's X at <= 64 MB).
MAX_CHUNK_VALUES = 8_000_000

INTERCEPT = 0.5
NOISE_SCALE = 0.5
METADATA_KEY = b"sparkgd.datagen"

#: Upper bound on stored values per LIBSVM chunk (its text is ~30 bytes per value).
LIBSVM_CHUNK_VALUES = 2_000_000
#: Where write_libsvm records its arguments (Spark ignores names starting with "_").
LIBSVM_INFO_FILE = "_sparkgd_datagen.json"
#: ``--nnz-per-row`` default (capped at the number of features).
DEFAULT_NNZ_PER_ROW = 100


def chunk_rows_for(features: int) -> int:
    """Rows per row group for ``features`` columns (deterministic in ``features``)."""
    return int(max(1, min(MAX_CHUNK_ROWS, MAX_CHUNK_VALUES // max(1, features))))


def true_model(task: str, features: int, classes: int = 3, seed: int = 0, nnz_per_row=None):
    """The (coefficients, intercept) ``write_dataset`` uses for these arguments.

    With ``nnz_per_row`` (k): the ones ``write_libsvm`` uses, scaled by ``1/sqrt(k)``
    instead of ``1/sqrt(d)`` so that margins over k nonzeros keep unit variance.
    """
    _check_task(task, classes)
    rng = np.random.default_rng([seed, 0x5EED])
    scale = 1.0 / np.sqrt(features if nnz_per_row is None else nnz_per_row)
    if task == "multiclass":
        coef = rng.standard_normal((classes, features)) * scale
        coef -= coef.mean(axis=0, keepdims=True)
        intercept = INTERCEPT * np.linspace(-1.0, 1.0, classes)
    else:
        coef = rng.standard_normal(features) * scale
        intercept = INTERCEPT
    return coef, intercept


def _check_task(task, classes):
    if task not in TASKS:
        raise ValueError("task must be one of %s, got %r" % ("|".join(TASKS), task))
    if task == "multiclass" and (int(classes) != classes or classes < 2):
        raise ValueError("classes must be an integer >= 2, got %r" % (classes,))


def _sigmoid(z):
    # Stable for any z; 0.5 * (1 + tanh(z / 2)) == 1 / (1 + exp(-z)).
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def _schema(features, features_format, weights, metadata):
    fields = []
    if features_format == "array":
        fields.append(pa.field("features", pa.list_(pa.float64())))
    else:
        fields.extend(pa.field("x%d" % j, pa.float64()) for j in range(features))
    fields.append(pa.field("label", pa.float64()))
    if weights:
        fields.append(pa.field("weight", pa.float64()))
    return pa.schema(fields, metadata={METADATA_KEY: metadata})


def _draw_labels(rng, task, z, num_classes):
    """Labels from margins ``z``: (n,) for regression / binary, (n, K) for multiclass."""
    n = z.shape[0]
    if task == "regression":
        return z + NOISE_SCALE * rng.standard_normal(n)
    if task == "binary":
        p = _sigmoid(z)
        return (rng.random(n) < p).astype(np.float64)
    p = _softmax(z)
    cum = np.cumsum(p, axis=1)
    u = rng.random(n)
    return np.minimum((u[:, None] >= cum).sum(axis=1), num_classes - 1).astype(np.float64)


def _make_chunk(task, n, d, coef, intercept, seed, file_index, chunk_index, weights):
    """(X, y, w) for one row group; w is None without weights."""
    rng = np.random.default_rng([seed, file_index, chunk_index])
    X = rng.standard_normal((n, d))
    z = X @ (coef.T if task == "multiclass" else coef) + intercept
    y = _draw_labels(rng, task, z, coef.shape[0])
    w = rng.uniform(0.5, 2.0, n) if weights else None
    return X, y, w


def _to_table(X, y, w, schema, features_format):
    n, d = X.shape
    cols = []
    if features_format == "array":
        offsets = pa.array(np.arange(0, n * d + 1, d, dtype=np.int32), type=pa.int32())
        cols.append(pa.ListArray.from_arrays(offsets, pa.array(X.reshape(-1), type=pa.float64())))
    else:
        Xt = np.ascontiguousarray(X.T)
        cols.extend(pa.array(Xt[j], type=pa.float64()) for j in range(d))
    cols.append(pa.array(y, type=pa.float64()))
    if w is not None:
        cols.append(pa.array(w, type=pa.float64()))
    return pa.Table.from_arrays(cols, schema=schema)


def _split_rows(rows, partitions):
    base, extra = divmod(rows, partitions)
    return [base + (1 if i < extra else 0) for i in range(partitions)]


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def _write_atomically(path, overwrite, write_files):
    """``write_files(tmp)`` into a fresh directory beside ``path``, then rename it to
    ``path`` (replacing an existing ``path`` only if ``overwrite``); on any failure the
    temporary directory is removed and ``path`` is left as it was. Returns what
    ``write_files`` returns."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, ".%s.tmp-%s" % (os.path.basename(os.path.abspath(path)), uuid.uuid4().hex[:12]))
    os.mkdir(tmp)
    try:
        result = write_files(tmp)
        if os.path.lexists(path):
            if not overwrite:
                raise FileExistsError("%s already exists (pass overwrite=True to replace it)" % path)
            _remove(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def _check_counts(*items):
    """``(name, value, lo)`` triples: each value an integer (not a bool) >= lo."""
    for name, value, lo in items:
        if isinstance(value, bool) or int(value) != value or value < lo:
            raise ValueError("%s must be an integer >= %d, got %r" % (name, lo, value))


def write_dataset(
    path,
    task="binary",
    rows=10_000,
    features=10,
    partitions=4,
    classes=3,
    seed=0,
    features_format="array",
    weights=False,
    overwrite=False,
):
    """Write a synthetic data set as ``path/part-NNNNN.parquet``, one file per partition.

    Columns: ``features`` (``list<double>``) when ``features_format="array"``, or
    ``x0 .. x{d-1}`` (double) when ``"columns"``; ``label`` (double); ``weight``
    (double, uniform in [0.5, 2)) when ``weights``.

    The files are written into a temporary directory beside ``path`` and renamed into
    place at the end. If ``path`` exists, ``FileExistsError`` is raised unless
    ``overwrite``, in which case it is replaced.

    Returns a dict: ``coefficients`` (ndarray ``(d,)`` or ``(K, d)``), ``intercept``
    (float, or ndarray ``(K,)``), ``task``, ``rows``, ``features``, ``classes``
    (None unless multiclass), ``partitions``, ``seed``, ``features_format``,
    ``weights``, ``path`` and ``files`` (the written file paths).
    """
    path = os.fspath(path)
    _check_task(task, classes)
    if features_format not in FORMATS:
        raise ValueError("features_format must be one of %s, got %r" % ("|".join(FORMATS), features_format))
    _check_counts(("rows", rows, 1), ("features", features, 1), ("partitions", partitions, 1))
    rows, features, partitions, seed = int(rows), int(features), int(partitions), int(seed)
    classes = int(classes) if task == "multiclass" else None
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError("%s already exists (pass overwrite=True to replace it)" % path)

    coef, intercept = true_model(task, features, classes or 3, seed)
    meta = {
        "task": task, "rows": rows, "features": features, "classes": classes,
        "partitions": partitions, "seed": seed, "features_format": features_format,
        "weights": bool(weights), "coefficients": np.asarray(coef).tolist(),
        "intercept": np.asarray(intercept).tolist(),
    }
    schema = _schema(features, features_format, weights, json.dumps(meta))
    chunk = chunk_rows_for(features)

    def write_files(tmp):
        names = []
        for fi, n_file in enumerate(_split_rows(rows, partitions)):
            name = "part-%05d.parquet" % fi
            with pq.ParquetWriter(os.path.join(tmp, name), schema, compression="snappy") as writer:
                for ci, start in enumerate(range(0, n_file, chunk)):
                    n = min(chunk, n_file - start)
                    X, y, w = _make_chunk(task, n, features, coef, intercept, seed, fi, ci, weights)
                    writer.write_table(_to_table(X, y, w, schema, features_format), row_group_size=n)
                    del X, y, w
            names.append(name)
        return names

    names = _write_atomically(path, overwrite, write_files)
    return {
        "coefficients": coef,
        "intercept": intercept,
        "task": task,
        "rows": rows,
        "features": features,
        "classes": classes,
        "partitions": partitions,
        "seed": seed,
        "features_format": features_format,
        "weights": bool(weights),
        "path": path,
        "files": [os.path.join(path, name) for name in names],
    }


# ----------------------------------------------------------------------------
# LIBSVM: sparse rows as text.
# ----------------------------------------------------------------------------


def _dense_draw(features, nnz_per_row):
    """Whether rows draw their indices from a full row of random keys (k > d/2)."""
    return 2 * nnz_per_row > features


def libsvm_chunk_rows(features: int, nnz_per_row: int) -> int:
    """Rows per LIBSVM chunk (deterministic in the arguments, so is the output)."""
    per_row = features if _dense_draw(features, nnz_per_row) else nnz_per_row
    return int(max(1, min(MAX_CHUNK_ROWS, LIBSVM_CHUNK_VALUES // max(1, per_row))))


def _row_indices(rng, n, d, k):
    """(n, k) int64: per row, k distinct indices in [0, d), sorted, uniform over k-subsets.

    For k <= d/2: draw with replacement, sort, and redraw only the repeated entries of
    the rows that have any (each redraw collides with probability <= k/d <= 1/2, so a
    few rounds over ever fewer rows suffice). The procedure treats every index alike,
    so each k-subset is equally likely. For k > d/2: the k smallest of d random keys.
    """
    if k == d:
        return np.broadcast_to(np.arange(d, dtype=np.int64), (n, d)).copy()
    if _dense_draw(d, k):
        keys = rng.random((n, d))
        idx = np.argpartition(keys, k - 1, axis=1)[:, :k].astype(np.int64)
        idx.sort(axis=1)
        return idx
    idx = rng.integers(0, d, size=(n, k), dtype=np.int64)
    idx.sort(axis=1)
    rows = np.arange(n)
    sub = idx
    while k > 1:
        dup = np.zeros(sub.shape, dtype=bool)
        np.equal(sub[:, 1:], sub[:, :-1], out=dup[:, 1:])
        bad = dup.any(axis=1)
        if not bad.any():
            break
        rows, sub, dup = rows[bad], sub[bad], dup[bad]
        sub[dup] = rng.integers(0, d, size=int(dup.sum()), dtype=np.int64)
        sub.sort(axis=1)
        idx[rows] = sub
    return idx


def _make_sparse_chunk(task, n, d, k, coef, intercept, rng):
    """(indices (n, k) 0-based, values (n, k), labels (n,)) for one LIBSVM chunk."""
    idx = _row_indices(rng, n, d, k)
    vals = rng.standard_normal((n, k))
    if task == "multiclass":
        # z[i, c] = sum_j vals[i, j] * coef[c, idx[i, j]]
        z = np.stack([np.einsum("ij,ij->i", vals, coef[c][idx]) for c in range(coef.shape[0])],
                     axis=1) + intercept
    else:
        z = np.einsum("ij,ij->i", vals, coef[idx]) + intercept
    y = _draw_labels(rng, task, z, coef.shape[0] if task == "multiclass" else 2)
    return idx, vals, y


def _libsvm_lines(idx, vals, y, task):
    """Arrow string array of the chunk's lines, each ``label i:v i:v ...\\n``.

    Arrow's double -> string cast prints the shortest decimal that parses back to the
    same double (as ``repr``), e.g. ``-0.6127044163341213``, ``3.3e-7``, ``0.000015``.
    """
    n, k = vals.shape
    if task == "regression":
        labels = pc.cast(pa.array(y, type=pa.float64()), pa.string())
    else:
        labels = pc.cast(pa.array(y.astype(np.int64)), pa.string())
    if n == 0:
        return pa.array([], type=pa.string())
    if k == 0:  # pragma: no cover - nnz_per_row >= 1
        return pc.binary_join_element_wise(labels, pa.scalar(""), "\n")
    # Indices and values as strings in one pass each, then "i:v" tokens.
    istr = pc.cast(pa.array((idx + 1).reshape(-1)), pa.string())
    vstr = pc.cast(pa.array(vals.reshape(-1), type=pa.float64()), pa.string())
    tokens = pc.binary_join_element_wise(istr, vstr, ":")
    del istr, vstr
    offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32), type=pa.int32())
    body = pc.binary_join(pa.ListArray.from_arrays(offsets, tokens), " ")
    del tokens
    lines = pc.binary_join_element_wise(labels, body, " ")
    del body
    return pc.binary_join_element_wise(lines, pa.scalar(""), "\n")


def _write_strings(f, arr):
    """Write a string array's values back to back (no separators) to binary file ``f``."""
    if len(arr) == 0:
        return
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32, count=len(arr) + 1,
                            offset=4 * arr.offset)
    f.write(memoryview(arr.buffers()[2])[int(offsets[0]):int(offsets[-1])])


def write_libsvm(
    path,
    task="binary",
    rows=10_000,
    features=1000,
    nnz_per_row=DEFAULT_NNZ_PER_ROW,
    partitions=4,
    classes=3,
    seed=0,
    overwrite=False,
):
    """Write a synthetic *sparse* data set as LIBSVM text, ``path/part-NNNNN.libsvm``.

    One file per partition (rows split evenly), each line ``label idx:val ...`` with
    exactly ``nnz_per_row`` distinct, sorted, 1-based indices drawn uniformly from
    ``1 .. features`` and values ``N(0, 1)``; see the module docstring for the model.
    Files are written chunk by chunk (at most ``LIBSVM_CHUNK_VALUES`` values each) into
    a temporary directory beside ``path``, renamed into place at the end. If ``path``
    exists, ``FileExistsError`` is raised unless ``overwrite``.

    Returns a dict: ``coefficients`` (ndarray ``(d,)`` or ``(K, d)``), ``intercept``,
    ``task``, ``rows``, ``features``, ``nnz_per_row``, ``nnz`` (stored values in all),
    ``classes`` (None unless multiclass), ``partitions``, ``seed``, ``format``
    (``"libsvm"``), ``path`` and ``files`` (the part files written).
    """
    path = os.fspath(path)
    _check_task(task, classes)
    _check_counts(("rows", rows, 1), ("features", features, 1), ("partitions", partitions, 1),
                  ("nnz_per_row", nnz_per_row, 1))
    rows, features, partitions, seed = int(rows), int(features), int(partitions), int(seed)
    nnz_per_row = int(nnz_per_row)
    if nnz_per_row > features:
        raise ValueError("nnz_per_row must be <= features (%d), got %d" % (features, nnz_per_row))
    if features >= 2**31:
        raise ValueError("features must be < 2^31 (Spark vector sizes are ints), got %d" % features)
    classes = int(classes) if task == "multiclass" else None
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError("%s already exists (pass overwrite=True to replace it)" % path)

    coef, intercept = true_model(task, features, classes or 3, seed, nnz_per_row=nnz_per_row)
    chunk = libsvm_chunk_rows(features, nnz_per_row)
    info = {
        "format": "libsvm", "task": task, "rows": rows, "features": features,
        "nnz_per_row": nnz_per_row, "classes": classes, "partitions": partitions, "seed": seed,
        "intercept": np.asarray(intercept).tolist(),
        "coefficients": "sparkgd.datagen.true_model(task, features, classes or 3, seed, "
                        "nnz_per_row=nnz_per_row)",
    }

    def write_files(tmp):
        names = []
        for fi, n_file in enumerate(_split_rows(rows, partitions)):
            name = "part-%05d.libsvm" % fi
            with open(os.path.join(tmp, name), "wb") as f:
                for ci, start in enumerate(range(0, n_file, chunk)):
                    n = min(chunk, n_file - start)
                    rng = np.random.default_rng([seed, fi, ci])
                    idx, vals, y = _make_sparse_chunk(task, n, features, nnz_per_row, coef,
                                                      intercept, rng)
                    lines = _libsvm_lines(idx, vals, y, task)
                    del idx, vals, y
                    _write_strings(f, lines)
                    del lines
            names.append(name)
        with open(os.path.join(tmp, LIBSVM_INFO_FILE), "w") as f:
            json.dump(dict(info, files=names), f, indent=1)
            f.write("\n")
        return names

    names = _write_atomically(path, overwrite, write_files)
    return {
        "coefficients": coef,
        "intercept": intercept,
        "task": task,
        "rows": rows,
        "features": features,
        "nnz_per_row": nnz_per_row,
        "nnz": rows * nnz_per_row,
        "classes": classes,
        "partitions": partitions,
        "seed": seed,
        "format": "libsvm",
        "path": path,
        "files": [os.path.join(path, name) for name in names],
    }


def hashed_rows(rows, fields=40, bits=24, zipf=1.2, seed=0):
    """Click-log-shaped rows: ``fields`` categorical fields, each value drawn from a
    Zipf(``zipf``) distribution over an unbounded vocabulary, one-hot and hashed into
    ``2^bits`` columns (the hashing trick: column = hash(field, value) mod 2^bits,
    collisions and all: two fields of a row that land on one column are one non-zero,
    2.0). Labels from a logistic model that weighs each (field, value) N(0, 1) /
    sqrt(fields) (a weight drawn from its hash: no table of values). -> (CSR matrix
    (rows, 2^bits), labels). Deterministic in the arguments."""
    import scipy.sparse as sp

    rng = np.random.default_rng([seed, 7])
    vals = rng.zipf(zipf, size=(rows, fields)).astype(np.uint64)
    field_ids = np.arange(fields, dtype=np.uint64)[None, :]
    # splitmix64 of (field, value): a fixed hash (Python's own is salted per process)
    h = vals * np.uint64(0x9E3779B97F4A7C15) + field_ids * np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(31)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(29)
    cols = (h & np.uint64((1 << bits) - 1)).astype(np.int64)
    g = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)      # uniform in [0, 1)
    weight = np.sqrt(-2.0 * np.log(np.maximum(g, 1e-300))) * np.cos(
        2 * np.pi * ((h & np.uint64(0x7FF)).astype(np.float64) / 2048.0))
    z = weight.sum(axis=1) / np.sqrt(fields) - 0.5
    y = (rng.random(rows) < 1.0 / (1.0 + np.exp(-z))).astype(np.float64)
    cols.sort(axis=1)
    keys = ((np.arange(rows, dtype=np.int64)[:, None] << bits) + cols).ravel()  # sorted
    first = np.ones(keys.size, dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    starts = np.flatnonzero(first)
    count = np.diff(np.r_[starts, keys.size]).astype(np.float64)
    keys = keys[starts]
    indptr = np.searchsorted(keys >> bits, np.arange(rows + 1))
    X = sp.csr_matrix((count, keys & ((1 << bits) - 1), indptr), shape=(rows, 1 << bits))
    return X, y


def write_hashed(path, rows=100_000, fields=40, bits=24, zipf=1.2, partitions=4, seed=0,
                 overwrite=False):
    """:func:`hashed_rows` as LIBSVM text, ``path/part-NNNNN.libsvm`` (1-based indices,
    as LIBSVM has them), rows split evenly over ``partitions`` files; -> (CSR matrix
    (rows, 2^bits), labels) of the same rows."""
    X, y = hashed_rows(rows, fields, bits, zipf, seed)

    def write_files(tmp):
        names = []
        start = 0
        for fi, n_file in enumerate(_split_rows(rows, partitions)):
            name = "part-%05d.libsvm" % fi
            with open(os.path.join(tmp, name), "w") as f:
                for i in range(start, start + n_file):
                    lo, hi = X.indptr[i], X.indptr[i + 1]
                    f.write("%d " % int(y[i]) + " ".join(
                        f"{c + 1}:{v:g}" for c, v in zip(X.indices[lo:hi].tolist(),
                                                       X.data[lo:hi].tolist())) + "\n")
            start += n_file
            names.append(name)
        return names

    _write_atomically(path, overwrite, write_files)
    return X, y


def _count(text):
    """Integer from '1000000', '1_000_000', '1e6', '10k', '2M'."""
    s = text.strip().lower().replace("_", "")
    mult = 1
    if s and s[-1] in "km":
        mult = 1000 if s[-1] == "k" else 1_000_000
        s = s[:-1]
    try:
        v = float(s) * mult
    except ValueError:
        raise argparse.ArgumentTypeError("not a count: %r" % text) from None
    if not np.isfinite(v) or v != int(v):
        raise argparse.ArgumentTypeError("not a whole number: %r" % text)
    return int(v)


def _size(path):
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(d, f))
    return total


def main(argv=None, prog="python -m sparkgd.datagen"):
    """Command line entry point; returns the exit status (0, or 2 on bad usage)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Write a synthetic partitioned data set: Parquet (OUT/part-NNNNN.parquet) "
                    "or, with --format libsvm, sparse LIBSVM text (OUT/part-NNNNN.libsvm).",
    )
    parser.add_argument("out", metavar="OUT", help="output directory")
    parser.add_argument("--task", choices=TASKS, default="binary")
    parser.add_argument("--rows", type=_count, default=10_000, help="number of rows (1e6, 10k, ... accepted)")
    parser.add_argument("--features", type=_count, default=10, help="number of features d")
    parser.add_argument("--partitions", type=_count, default=4, help="number of files")
    parser.add_argument("--classes", type=_count, default=3, help="number of classes (multiclass)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=CLI_FORMATS, default="array", dest="features_format",
                        help="Parquet with features as one list<double> column (array) or as "
                             "x0..x{d-1} columns (columns); or sparse LIBSVM text (libsvm)")
    parser.add_argument("--nnz-per-row", type=_count, default=None, metavar="K",
                        help="libsvm: nonzeros per row (default %d, or d if smaller)"
                             % DEFAULT_NNZ_PER_ROW)
    parser.add_argument("--weights", action="store_true",
                        help="add a weight column, uniform in [0.5, 2) (Parquet only)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)

    libsvm = args.features_format == "libsvm"
    if libsvm and args.weights:
        print("sparkgd: error: --weights: LIBSVM has no weight column", file=sys.stderr)
        return 2
    if not libsvm and args.nnz_per_row is not None:
        print("sparkgd: error: --nnz-per-row applies only to --format libsvm", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    try:
        if libsvm:
            nnz = args.nnz_per_row
            if nnz is None:
                nnz = max(1, min(DEFAULT_NNZ_PER_ROW, args.features))
            info = write_libsvm(
                args.out, task=args.task, rows=args.rows, features=args.features,
                nnz_per_row=nnz, partitions=args.partitions, classes=args.classes,
                seed=args.seed, overwrite=args.overwrite,
            )
        else:
            info = write_dataset(
                args.out, task=args.task, rows=args.rows, features=args.features,
                partitions=args.partitions, classes=args.classes, seed=args.seed,
                features_format=args.features_format, weights=args.weights,
                overwrite=args.overwrite,
            )
    except FileExistsError:
        print("sparkgd: error: %s already exists (use --overwrite to replace it)" % args.out, file=sys.stderr)
        return 2
    except ValueError as e:
        print("sparkgd: error: %s" % e, file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - t0
    what = info["task"] + (" (%d classes)" % info["classes"] if info["classes"] else "")
    if libsvm:
        print("wrote %s: %d rows x %d features, %s, libsvm format, %d nonzeros per row "
              "(%d in all), %d files, %.1f MB in %.1f s"
              % (info["path"], info["rows"], info["features"], what, info["nnz_per_row"],
                 info["nnz"], len(info["files"]), _size(info["path"]) / 1e6, elapsed))
    else:
        print("wrote %s: %d rows x %d features, %s, %s format%s, %d files, %.1f MB in %.1f s"
              % (info["path"], info["rows"], info["features"], what, info["features_format"],
                 ", weighted" if info["weights"] else "", len(info["files"]),
                 _size(info["path"]) / 1e6, elapsed))
    return 0

if __name__ == "__main__":
    sys.exit(main())
