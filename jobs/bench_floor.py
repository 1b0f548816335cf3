"""``jobs/benchmark.py --floors``: each pass beside the floor of the machine it runs on.

    ./spark-submit.sh --master local[2] --driver-memory 8g jobs/benchmark.py --floors

A pass must read every byte of the blocks at least once; how long one read takes on
this machine, measured in the same run, is what a pass is judged against (not NumPy,
which pays the same costs). For each data set, on served blocks (the default engine):

* the pass: one full-gradient evaluation (the serving tasks' kernels, the wire, the
  tree), best of ``--repeat``;
* the served floor: the same tasks asked to read their blocks once and sum the values
  (work mode ``read``: :func:`sparkgd.kernels.read_sums`), through the same wire;
* in this driver, on a copy of the same rows: one read (the same ``read_sums``, in as
  many threads as there are serving tasks; a CSR matrix is one piece, one thread), and
  the library's own pass (NumPy ``X @ W`` / ``R.T @ X`` for dense
  rows, SciPy's ``X @ w`` / ``X.T @ r`` for CSR).

Data sets: ``--rows`` x ``--features`` dense logistic (float64 and float32 blocks),
the same shape multinomial with ``--floor-classes`` classes, and 20,000 x 10^6 CSR with
100 non-zeros a row (``jobs/bench_sparse.write_data``). Runs alternate sides so both
see the same background. Prints one table; ``--json`` writes the figures.
"""
import json
import os
import time

import numpy as np


def best_of(fn, repeat, pause=0.3):
    """The fastest of ``repeat`` calls, after a pause in which BLAS threads go idle."""
    time.sleep(pause)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def local_pass(X, y, W, b, k):
    """The library's own pass on one process: margins, loss derivative, gradient."""
    Z = X @ W.T + b
    if k == 1:
        r = 1.0 / (1.0 + np.exp(-Z[:, 0])) - y
        return X.T @ r if hasattr(X, "indices") else r.astype(X.dtype) @ X
    Z -= Z.max(axis=1, keepdims=True)
    np.exp(Z, out=Z)
    Z /= Z.sum(axis=1, keepdims=True)
    Z[np.arange(Z.shape[0]), y.astype(int)] -= 1.0
    return (X.T @ Z).T if hasattr(X, "indices") else Z.T.astype(X.dtype) @ X


def measure(spark, name, df, X, y, k, repeat, dtype="float64", rounds=2):
    """One data set: the served pass and read, the driver's read and library pass."""
    from sparkgd import kernels, work
    from sparkgd.data import resolve_input
    from sparkgd.engine import Engine
    from sparkgd.modes.sync import DistributedObjective
    from sparkgd.penalties import Penalty

    d = X.shape[1]
    loss = kernels.make_loss("logistic" if k == 1 else "multinomial")
    layout = kernels.Layout(d, k, True)
    theta = np.random.default_rng(0).normal(size=layout.size) * 0.01
    W, b = layout.split(theta)
    Xl = X.astype(np.float32) if dtype == "float32" else X
    out = {"name": name, "dtype": dtype}
    with Engine.open(df, resolve_input(df.schema), store="served", dtype=dtype,
                     parse_work=work.parse) as engine:
        obj = DistributedObjective(engine, loss, layout, Penalty(layout))
        tasks = engine.num_tasks
        obj(theta)
        engine.evaluate(theta, loss, layout, work={"mode": "read"})
        # the served read sums what the driver's read sums: the same rows, once each
        # (CSR blocks are re-indexed to the columns the rows touch: values only there)
        for _ in range(rounds):
            for key, fn in (
                    ("pass", lambda: obj(theta)),
                    ("read", lambda: engine.evaluate(theta, loss, layout,
                                                     work={"mode": "read"})),
                    ("driver_read", lambda: kernels.read_sums([(Xl, y, None)], tasks)),
                    ("driver_pass", lambda: local_pass(Xl, y, W.astype(Xl.dtype), b, k))):
                out[key] = min(out.get(key, float("inf")), best_of(fn, repeat))
        out["tasks"] = tasks
        out["engine"] = engine.kind
    out["pass_over_read"] = out["pass"] / out["read"]
    out["pass_over_driver_read"] = out["pass"] / out["driver_read"]
    print(f"{name} ({dtype}): pass {out['pass']:.4f}s, served read {out['read']:.4f}s, "
          f"driver read ({tasks} threads) {out['driver_read']:.4f}s, driver "
          f"{'SciPy' if hasattr(X, 'indices') else 'NumPy'} pass {out['driver_pass']:.4f}s",
          flush=True)
    return out


def run(spark, args, numpy_arrays):
    from pyspark.ml.functions import array_to_vector

    from sparkgd import datagen
    from sparkgd.data import read_libsvm

    import bench_sparse

    rows, d, k = int(args.rows), args.features, args.floor_classes
    results = []
    for task, classes in (("binary", 2), ("multiclass", k)):
        path = os.path.join(args.tmp, task)
        datagen.write_dataset(path, task=task, rows=rows, features=d,
                              partitions=args.partitions, classes=classes)
        X, y = numpy_arrays(path)
        df = spark.read.parquet(path).select(array_to_vector("features").alias("features"),
                                             "label")
        kk = 1 if task == "binary" else classes
        for dtype in (("float64", "float32") if task == "binary" else ("float64",)):
            name = f"dense {rows} x {d}" + ("" if kk == 1 else f", multinomial K={kk}")
            results.append(measure(spark, name, df, X, y, kk, args.repeat, dtype))
        del X, y
    path = os.path.join(args.tmp, "csr")
    X, y = bench_sparse.write_data(path, 20_000, 1_000_000, 100, 0.1)
    df = read_libsvm(spark, path, num_features=1_000_000)
    results.append(measure(spark, "CSR 20000 x 10^6, 100 a row", df, X, y, 1, args.repeat))

    print("\n| data | blocks | pass | served read (floor) | pass / floor | driver read "
          "| driver NumPy/SciPy pass |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['name']} | {r['dtype']} | {r['pass']:.4f} s | {r['read']:.4f} s | "
              f"{r['pass_over_read']:.2f}x | {r['driver_read']:.4f} s "
              f"({r['pass_over_driver_read']:.2f}x) | {r['driver_pass']:.4f} s |")
    f32 = [r for r in results if r["dtype"] == "float32"]
    if f32:
        ratio = f32[0]["pass"] / results[0]["pass"]
        print(f"\nfloat32 pass / float64 pass: {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0
