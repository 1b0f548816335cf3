"""Synthetic, partitioned Parquet data sets for sparkgd (NumPy + PyArrow only, no Spark).

    python -m sparkgd.datagen OUT --task binary --rows 1000000 --features 100 --partitions 8

writes ``OUT/part-00000.parquet`` ... ``OUT/part-00007.parquet``. Files are written one
row group at a time, so memory stays bounded whatever the size of the data set.

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
import pyarrow.parquet as pq

__all__ = ["write_dataset", "true_model", "main"]

TASKS = ("binary", "regression", "multiclass")
FORMATS = ("array", "columns")

#: Upper bound on rows per row group.
MAX_CHUNK_ROWS = 200_000
#: Upper bound on feature values per row group (keeps a chunk's X at <= 64 MB).
MAX_CHUNK_VALUES = 8_000_000

INTERCEPT = 0.5
NOISE_SCALE = 0.5
METADATA_KEY = b"sparkgd.datagen"


def chunk_rows_for(features: int) -> int:
    """Rows per row group for ``features`` columns (deterministic in ``features``)."""
    return int(max(1, min(MAX_CHUNK_ROWS, MAX_CHUNK_VALUES // max(1, features))))


def true_model(task: str, features: int, classes: int = 3, seed: int = 0):
    """The (coefficients, intercept) ``write_dataset`` uses for these arguments."""
    _check_task(task, classes)
    rng = np.random.default_rng([seed, 0x5EED])
    scale = 1.0 / np.sqrt(features)
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


def _make_chunk(task, n, d, coef, intercept, seed, file_index, chunk_index, weights):
    """(X, y, w) for one row group; w is None without weights."""
    rng = np.random.default_rng([seed, file_index, chunk_index])
    X = rng.standard_normal((n, d))
    if task == "regression":
        y = X @ coef + intercept + NOISE_SCALE * rng.standard_normal(n)
    elif task == "binary":
        p = _sigmoid(X @ coef + intercept)
        y = (rng.random(n) < p).astype(np.float64)
    else:
        p = _softmax(X @ coef.T + intercept)
        cum = np.cumsum(p, axis=1)
        u = rng.random(n)
        y = np.minimum((u[:, None] >= cum).sum(axis=1), coef.shape[0] - 1).astype(np.float64)
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
    for name, value, lo in (("rows", rows, 1), ("features", features, 1), ("partitions", partitions, 1)):
        if isinstance(value, bool) or int(value) != value or value < lo:
            raise ValueError("%s must be an integer >= %d, got %r" % (name, lo, value))
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

    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, ".%s.tmp-%s" % (os.path.basename(os.path.abspath(path)), uuid.uuid4().hex[:12]))
    os.mkdir(tmp)
    names = []
    try:
        for fi, n_file in enumerate(_split_rows(rows, partitions)):
            name = "part-%05d.parquet" % fi
            with pq.ParquetWriter(os.path.join(tmp, name), schema, compression="snappy") as writer:
                for ci, start in enumerate(range(0, n_file, chunk)):
                    n = min(chunk, n_file - start)
                    X, y, w = _make_chunk(task, n, features, coef, intercept, seed, fi, ci, weights)
                    writer.write_table(_to_table(X, y, w, schema, features_format), row_group_size=n)
                    del X, y, w
            names.append(name)
        if os.path.lexists(path):
            if not overwrite:
                raise FileExistsError("%s already exists (pass overwrite=True to replace it)" % path)
            _remove(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

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
        description="Write a synthetic partitioned Parquet data set (OUT/part-NNNNN.parquet).",
    )
    parser.add_argument("out", metavar="OUT", help="output directory")
    parser.add_argument("--task", choices=TASKS, default="binary")
    parser.add_argument("--rows", type=_count, default=10_000, help="number of rows (1e6, 10k, ... accepted)")
    parser.add_argument("--features", type=_count, default=10, help="number of features d")
    parser.add_argument("--partitions", type=_count, default=4, help="number of files")
    parser.add_argument("--classes", type=_count, default=3, help="number of classes (multiclass)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=FORMATS, default="array", dest="features_format",
                        help="features as one list<double> column, or as x0..x{d-1} columns")
    parser.add_argument("--weights", action="store_true", help="add a weight column, uniform in [0.5, 2)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    try:
        info = write_dataset(
            args.out, task=args.task, rows=args.rows, features=args.features,
            partitions=args.partitions, classes=args.classes, seed=args.seed,
            features_format=args.features_format, weights=args.weights, overwrite=args.overwrite,
        )
    except FileExistsError:
        print("sparkgd: error: %s already exists (use --overwrite to replace it)" % args.out, file=sys.stderr)
        return 2
    except ValueError as e:
        print("sparkgd: error: %s" % e, file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - t0
    what = info["task"] + (" (%d classes)" % info["classes"] if info["classes"] else "")
    print("wrote %s: %d rows x %d features, %s, %s format%s, %d files, %.1f MB in %.1f s"
          % (info["path"], info["rows"], info["features"], what, info["features_format"],
             ", weighted" if info["weights"] else "", len(info["files"]),
             _size(info["path"]) / 1e6, elapsed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
