"""Benchmark: sparkgd vs pyspark.ml vs single-process NumPy/SciPy, side by side in one run.

    ./spark-submit.sh --master local[2] --driver-memory 8g jobs/benchmark.py \\
        --rows 1000000 --features 100 --partitions 8 --json bench.json

Generates logistic data (or takes ``--data``), then measures, in this one run:

* build: Spark ML's read + vectorize + cache vs sparkgd's blocks from the Parquet files;
* one full-gradient pass on warm data: NumPy (``X @ w``, then ``X.T @ r``, in this
  driver; runs of its passes alternate with runs of sparkgd's) vs sparkgd's distributed
  evaluation: the default for dense data (the served store: the tasks that built the
  blocks keep them in memory and serve the passes), the file store with long-lived
  serving tasks, both also with dense features stored as float32 (``dtype="float32"``,
  sums in float64), the file store with one Spark job per pass, and the file store
  streamed (``spark.sparkgd.blockMemory=64m``: each pass maps the block files a window at
  a time, as a memory-capped worker does) -- its pass against the served one and against
  one read of its block files through the same windows;
* a whole L-BFGS fit (tol 1e-8) on a cached DataFrame: Spark ML LogisticRegression vs
  sparkgd, each library's first fit in the JVM ("cold", sparkgd first, then Spark ML) and
  the best of its later fits ("warm"), then sparkgd at tol 1e-12; every model's
  objective is evaluated by one NumPy function and compared with the optimum SciPy's
  L-BFGS-B reaches on the NumPy arrays.

``--memory-only`` measures the block store alone in a fresh JVM, with the peak memory
(PSS: RSS with shared pages split) of the JVM and every Python process under it.

Prints a table of times and ratios (sparkgd / reference: below 1 is faster) and writes
JSON. Machines are shared and noisy: compare the ratios within one run.
"""
import argparse
import json
import os
import sys
import tempfile
import threading
import time

import numpy as np


def _pss(pid):
    """Proportional set size: shared pages (the memory-mapped blocks two Python workers
    both map) are split between the processes instead of counted twice."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class PeakRss:
    """Samples the summed memory (PSS) of a process tree (the JVM and its Python children)."""

    def __init__(self, root_pid, interval=0.2):
        self.root, self.interval = root_pid, interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _children():
        kids = {}
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(pid))
        return kids

    def sample(self):
        """-> (total RSS of the tree, RSS of the root JVM alone)."""
        kids = self._children()
        stack, total, root = [self.root], 0, 0
        while stack:
            pid = stack.pop()
            rss = _pss(pid)
            total += rss
            if pid == self.root:
                root = rss
            stack.extend(kids.get(pid, []))
        return total, root

    def _run(self):
        while not self._stop.is_set():
            total, root = self.sample()
            if total > self.peak:
                self.peak, self.peak_root = total, root
            time.sleep(self.interval)

    def __enter__(self):
        self.peak, self.peak_root = self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def numpy_arrays(path):
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["features", "label"])
    feats = table.column("features").combine_chunks()
    n = len(feats)
    X = feats.flatten().to_numpy().reshape(n, -1)
    y = table.column("label").to_numpy()
    return np.ascontiguousarray(X), y


def numpy_objective(theta, X, y, reg):
    """DESIGN.md's logistic objective and gradient, written directly in NumPy."""
    z = X @ theta[:-1] + theta[-1]
    beta = theta[:-1]
    f = np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * reg * beta @ beta
    r = (0.5 * (1.0 + np.tanh(0.5 * z)) - y) / y.shape[0]
    return float(f), np.r_[X.T @ r + reg * beta, r.sum()]


def scipy_optimum(objective, size):
    """The objective's minimum to the last digits: L-BFGS-B until it can go no lower."""
    from scipy.optimize import minimize

    res = minimize(objective, np.zeros(size), jac=True, method="L-BFGS-B",
                   options={"ftol": 0.0, "gtol": 1e-12, "maxiter": 500})
    return float(res.fun)


def model_theta(model):
    """[coefficients, intercept] of a binary sparkgd or Spark ML model."""
    coef = model.coefficients
    coef = coef.toArray() if hasattr(coef, "toArray") else coef  # Spark ML: a DenseVector
    return np.r_[np.asarray(coef).ravel(), model.intercept]


def settled(fn, pause=0.3):
    """Run ``fn`` after a pause in which other processes' BLAS threads stop spinning."""
    time.sleep(pause)
    return fn()


def timed(fn, repeat=1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def _in_scratch(args, run):
    """``run()`` with ``args.tmp`` a fresh directory (under ``--workdir``), removed after."""
    import shutil

    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    args.tmp = tempfile.mkdtemp(prefix="sparkgd-bench-", dir=args.workdir)
    try:
        run()
    finally:
        shutil.rmtree(args.tmp, ignore_errors=True)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="jobs/benchmark.py")
    p.add_argument("--rows", type=float, default=1e6)
    p.add_argument("--features", type=int, default=100)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--data", default=None, help="existing Parquet data (features, label)")
    p.add_argument("--workdir", default=None, help="where generated data goes (temp dir)")
    p.add_argument("--reg-param", type=float, default=1e-3)
    p.add_argument("--repeat", type=int, default=5, help="timed repetitions of one pass")
    p.add_argument("--fit-repeat", type=int, default=3,
                   help="fits of each library (the first is reported as cold, the best of the "
                        "others as warm)")
    p.add_argument("--skip-spark-ml", action="store_true")
    p.add_argument("--sparse", action="store_true",
                   help="sparse LIBSVM data instead (see jobs/bench_sparse.py): iterations and "
                        "seconds to 1e-6 of the optimum, sparkgd vs Spark ML vs SciPy")
    p.add_argument("--nnz-per-row", type=int, default=100, help="--sparse: non-zeros a row")
    p.add_argument("--value-scale", type=float, default=0.1,
                   help="--sparse: standard deviation of the non-zero values")
    p.add_argument("--sparkgd-iter", type=int, default=100, help="--sparse: sparkgd maxIter")
    p.add_argument("--hashed-bits", type=lambda s: [int(x) for x in s.split(",")],
                   default=None, help="--sparse: click-log rows hashed into 2^bits columns "
                                      "instead (e.g. 24,28; jobs/bench_sparse.run_hashed)")
    p.add_argument("--spark-ml-iter", type=int, default=100, help="--sparse: Spark ML maxIter")
    p.add_argument("--comm", action="store_true",
                   help="time and bytes of one pass by topology and codec at 2, 4, 8, 16 "
                        "tasks, against the cost model (see jobs/bench_comm.py; run with "
                        "--master 'local[16]')")
    p.add_argument("--comm-tasks", type=lambda s: [int(x) for x in s.split(",")],
                   default=[2, 4, 8, 16], help="--comm: task counts")
    p.add_argument("--passes", type=int, default=30, help="--comm: timed passes each")
    p.add_argument("--calibrate-seconds", type=float, default=3.0,
                   help="--comm: time to measure the cost model's prices")
    p.add_argument("--modes", action="store_true",
                   help="sync, local and async sgd on the same data, with and without one "
                        "task slowed (see jobs/bench_modes.py; run with --master 'local[4]')")
    p.add_argument("--tasks", type=int, default=4, help="--modes: serving tasks")
    p.add_argument("--slow", type=float, default=3.0, help="--modes: the slowed task's factor")
    p.add_argument("--step-size", type=float, default=0.3, help="--modes: sgd's step")
    p.add_argument("--max-iter", type=int, default=300, help="--modes: maxIter of every fit")
    p.add_argument("--local-steps", type=int, default=10, help="--modes: local's localSteps")
    p.add_argument("--staleness", type=int, default=4, help="--modes: async's staleness")
    p.add_argument("--target", type=float, default=1e-3,
                   help="--modes: relative distance to the optimum to time")
    p.add_argument("--dp", action="store_true",
                   help="DP-SGD: held-out accuracy against epsilon on generated data and on "
                        "the breast-cancer data, beside diffprivlib (see jobs/bench_dp.py)")
    p.add_argument("--dp-rows", type=int, default=200000, help="--dp: generated rows")
    p.add_argument("--dp-features", type=int, default=50, help="--dp: generated features")
    p.add_argument("--dp-optimizer", default="momentum", help="--dp: optimizer")
    p.add_argument("--dp-step", type=float, default=0.5, help="--dp: stepSize")
    p.add_argument("--dp-steps", type=int, default=200, help="--dp: maxIter (steps)")
    p.add_argument("--dp-q", type=float, default=0.05, help="--dp: miniBatchFraction")
    p.add_argument("--dp-clip", type=float, default=1.0, help="--dp: maxGradNorm")
    p.add_argument("--dp-delta", type=float, default=1e-5, help="--dp: dpDelta")
    p.add_argument("--dp-runs", type=int, default=10, help="--dp: breast-cancer runs")
    p.add_argument("--bc-optimizer", default="momentum", help="--dp breast cancer: optimizer")
    p.add_argument("--bc-step", type=float, default=0.5, help="--dp breast cancer: stepSize")
    p.add_argument("--bc-steps", type=int, default=60, help="--dp breast cancer: steps")
    p.add_argument("--bc-q", type=float, default=0.25,
                   help="--dp breast cancer: miniBatchFraction")
    p.add_argument("--bc-clip", type=float, default=1.0, help="--dp breast cancer: maxGradNorm")
    p.add_argument("--bc-reg", type=float, default=1e-3, help="--dp breast cancer: regParam")
    p.add_argument("--floors", action="store_true",
                   help="each pass beside one read of its blocks (dense float64/float32, "
                        "multinomial, CSR 20k x 10^6; see jobs/bench_floor.py)")
    p.add_argument("--floor-classes", type=int, default=10, help="--floors: multinomial K")
    p.add_argument("--crypto", action="store_true",
                   help="a served pass with Spark's encryption on (a child application: "
                        "spark.authenticate + spark.network.crypto.enabled) against this "
                        "one's (jobs/bench_crypto.py)")
    p.add_argument("--crypto-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--select", action="store_true",
                   help="CrossValidator and TrainValidationSplit: sparkgd's beside Spark ML's")
    p.add_argument("--select-rows", type=int, default=200000, help="--select: rows")
    p.add_argument("--select-features", type=int, default=50, help="--select: features")
    p.add_argument("--select-folds", type=int, default=3, help="--select: numFolds")
    p.add_argument("--select-runs", type=int, default=2,
                   help="--select: runs of each selection (the first is cold)")
    p.add_argument("--select-parallelism", type=int, default=1,
                   help="--select: the selections' parallelism")
    p.add_argument("--json", default=None)
    p.add_argument("--memory-only", action="store_true",
                   help="only build sparkgd's blocks from the Parquet files and run passes, "
                        "reporting peak memory (PSS): run it in its own spark-submit so nothing "
                        "else has grown the JVM")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"],
                   help="block storage of --memory-only")
    p.add_argument("--store", default="auto", choices=["auto", "served", "files"],
                   help="block store of --memory-only (auto: what a fit uses)")
    args = p.parse_args(argv)

    from pyspark.sql import SparkSession
    from pyspark.ml.functions import array_to_vector

    import sparkgd
    from sparkgd import kernels, work
    from sparkgd.data import resolve_input
    from sparkgd.engine import Engine
    from sparkgd.modes.sync import DistributedObjective
    from sparkgd.penalties import Penalty

    spark = SparkSession.builder.appName("sparkgd-benchmark").getOrCreate()
    sc = spark.sparkContext
    if args.crypto or args.crypto_child:
        import bench_crypto

        return (bench_crypto.child if args.crypto_child else bench_crypto.run)(spark, args)
    if args.comm:
        import bench_comm

        return _in_scratch(args, lambda: bench_comm.run(spark, args))
    if args.dp:
        import bench_dp

        return _in_scratch(args, lambda: bench_dp.run(spark, args))
    if args.modes:
        import bench_modes

        return _in_scratch(args, lambda: bench_modes.run(spark, args))
    if args.select:
        import bench_select

        return _in_scratch(args, lambda: bench_select.run(spark, args))
    if args.floors:
        import bench_floor

        return _in_scratch(args, lambda: bench_floor.run(spark, args, numpy_arrays))
    if args.sparse:
        import bench_sparse

        # the driver's Python (SciPy's copy of the rows) is under the JVM too
        run = bench_sparse.run_hashed if args.hashed_bits else bench_sparse.run
        return _in_scratch(args, lambda: run(spark, args, lambda: PeakRss(os.getppid())))
    results = {"master": sc.master, "rows": int(args.rows), "features": args.features,
               "partitions": args.partitions}

    path = args.data
    tmp = None
    if path is None:
        from sparkgd import datagen

        if args.workdir:
            os.makedirs(args.workdir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix="sparkgd-bench-", dir=args.workdir)
        path = os.path.join(tmp, "data")
        t, _ = timed(lambda: datagen.write_dataset(path, task="binary", rows=int(args.rows),
                                                   features=args.features,
                                                   partitions=args.partitions))
        print(f"generated {int(args.rows)} x {args.features} in {t:.1f}s at {path}", flush=True)
    raw_bytes = int(args.rows) * args.features * 8
    results["raw_bytes"] = raw_bytes

    if args.memory_only:
        return memory_only(spark, path, args, raw_bytes, tmp)

    # --- single-process NumPy --------------------------------------------------------------
    X, y = numpy_arrays(path)
    n, d = X.shape
    theta = np.random.default_rng(0).normal(size=d + 1) * 0.01
    loss = kernels.make_loss("logistic")
    layout = kernels.Layout(d, 1, True)

    def numpy_pass():
        z = X @ theta[:d] + theta[d]
        r = 1.0 / (1.0 + np.exp(-z)) - y
        return X.T @ r, r.sum()

    f_np = kernels.block_sums(X, y, None, theta, loss, layout)
    numpy_times = []
    df = spark.read.parquet(path)

    # --- whole fits on a cached DataFrame ------------------------------------------------
    # Each library's first fit in this JVM ("cold") comes first, one right after the
    # other; later fits ("warm": JIT-compiled code paths, started Python workers) come
    # after the pass measurements, alternating who goes first.
    t0 = time.perf_counter()
    vec = df.select(array_to_vector("features").alias("features"), "label").cache()
    vec.count()
    results["spark_ml_build_s"] = time.perf_counter() - t0
    fits = {"sparkgd": lambda: sparkgd.LogisticRegression(
        regParam=args.reg_param, tol=1e-8, maxIter=100).fit(vec)}
    if not args.skip_spark_ml:
        from pyspark.ml.classification import LogisticRegression as SparkLR

        fits["spark_ml"] = lambda: SparkLR(regParam=args.reg_param, standardization=False,
                                           tol=1e-8, maxIter=100).fit(vec)
    thetas = {}

    def fit_round(rnd):
        for key in sorted(fits, reverse=rnd % 2 == 0):  # sparkgd first when cold
            t, model = timed(fits[key])
            results.setdefault(f"{key}_fit_all_s", []).append(t)
            results[f"{key}_iterations"] = int(model.summary.totalIterations)
            thetas[key] = model_theta(model)
            print(f"{key} fit {rnd + 1}: {t:.2f}s ({results[f'{key}_iterations']} it)",
                  flush=True)

    fit_round(0)

    # --- one gradient pass on warm blocks, NumPy's alongside ---------------------------------
    # (store, engine): the file store with a Spark job per pass or with serving
    # tasks, and the default for dense
    # data: the served store (the tasks that built the blocks serve them). Runs of
    # NumPy passes alternate with runs of sparkgd's, so both see the same background; not
    # pass by pass: each side's BLAS threads spin for a while after a product and would
    # slow the other side's next pass (measured: both sides about 2x slower).
    spec = resolve_input(df.schema)
    # a trailing 32: dense features kept as float32 (dtype="float32"), sums in float64.
    # "streamed": the file store with the passes reading the block files in windows
    # (spark.sparkgd.blockMemory below a task's blocks: what a memory-capped worker does)
    engines = {"files": ("jobs", "workers"), "files32": ("workers",),
               "streamed": ("workers",), "served": ("served",), "served32": ("served",)}
    # (No memory figures here: this driver holds NumPy's copy of the data; --memory-only
    # measures the block store alone.)
    for store in ("files", "files32", "streamed", "served", "served32"):
        t0 = time.perf_counter()
        if store == "streamed":
            spark.conf.set("spark.sparkgd.blockMemory", "64m")
        try:
            engine = Engine.open(df, spec, store=store.replace("32", "").replace(
                                     "streamed", "files"),
                                 dtype="float32" if store.endswith("32") else "float64",
                                 parse_work=work.parse)
        finally:
            spark.conf.unset("spark.sparkgd.blockMemory")
        if store == "streamed":
            assert "streamed" in engine.description, engine.description
        results[f"sparkgd_{store}_build_s"] = time.perf_counter() - t0
        # NumPy's arrays are read anew next to the blocks: on this VM where an array
        # lands in memory changes how fast it streams, for either side.
        del X, y
        X, y = numpy_arrays(path)
        try:
            for kind in engines[store]:
                engine.kind = kind
                obj = DistributedObjective(engine, loss, layout, Penalty(layout))
                obj(theta)  # warm: page cache, Python workers, serving tasks
                best = floor = float("inf")
                read = lambda: engine.evaluate(theta, loss, layout,  # noqa: E731
                                               work={"mode": "read"})
                read()
                for _ in range(2):  # rounds: NumPy's passes, then sparkgd's, its floor
                    numpy_times.append(settled(lambda: timed(numpy_pass, args.repeat)[0]))
                    t, (f, g) = settled(lambda: timed(lambda: obj(theta), args.repeat))
                    best = min(best, t)
                    floor = min(floor, settled(lambda: timed(read, args.repeat)[0]))
                # the floor: the same tasks reading their blocks once (work "read")
                results[f"sparkgd_{store}_{kind}_floor_s"] = floor
                assert engine.kind == kind, (kind, engine.kind)
                results[f"sparkgd_{store}_{kind}_pass_s"] = best
                # float32 features: the loss moves by about float32's rounding
                tol = 1e-6 if store.endswith("32") else 1e-10
                assert abs(f - f_np[0] / f_np[1]) <= tol * abs(f), (f, f_np[0] / f_np[1])
                print(f"sparkgd[{store}, {kind}]: pass {best:.4f}s, one read of its blocks "
                      f"{floor:.4f}s (NumPy so far {min(numpy_times):.4f}s)", flush=True)
        finally:
            engine.close()
        print(f"sparkgd[{store}]: build {results[f'sparkgd_{store}_build_s']:.1f}s", flush=True)
    results["numpy_pass_s"] = min(numpy_times)
    del X

    # --- warm fits ------------------------------------------------------------------------
    for rnd in range(1, max(1, args.fit_repeat)):
        fit_round(rnd)
    for key in fits:
        times = results[f"{key}_fit_all_s"]
        results[f"{key}_fit_cold_s"] = times[0]
        results[f"{key}_fit_s"] = min(times[1:]) if len(times) > 1 else times[0]
    t, model = timed(lambda: sparkgd.LogisticRegression(
        regParam=args.reg_param, tol=1e-12, maxIter=100).fit(vec))
    results["sparkgd_tol12_fit_s"] = t
    results["sparkgd_tol12_iterations"] = int(model.summary.totalIterations)
    thetas["sparkgd_tol12"] = model_theta(model)
    print(f"sparkgd tol 1e-12 fit: {t:.2f}s ({model.summary.totalIterations} it)", flush=True)
    vec.unpersist()

    # --- every model's objective, by one function, against SciPy's optimum -------------------
    X, y = numpy_arrays(path)
    objective = lambda t: numpy_objective(t, X, y, args.reg_param)  # noqa: E731
    best = scipy_optimum(objective, d + 1)
    results["scipy_objective"] = best
    for key, th in thetas.items():
        results[f"{key}_objective"] = objective(th)[0]
        print(f"{key}: objective {results[f'{key}_objective']:.15f} "
              f"({results[f'{key}_objective'] - best:+.2e} from SciPy's)", flush=True)
    del X

    # --- the table -----------------------------------------------------------------------
    def row(name, ours, ref, ref_name):
        ratio = ours / ref if ref else float("nan")
        return f"| {name} | {ours:.3f} s | {ref:.3f} s ({ref_name}) | {ratio:.2f}x |"

    lines = ["| measure | sparkgd | reference | ratio |", "| --- | --- | --- | --- |"]
    names = {("served", "served"): "one gradient pass (default for dense data: served store)",
             ("served32", "served"): "one gradient pass, served, float32 (dtype=float32)",
             ("files", "workers"): "one gradient pass, file store, serving tasks",
             ("files32", "workers"): "one gradient pass, file store, float32",
             ("files", "jobs"): "one gradient pass, file store, a Spark job per pass",
             ("streamed", "workers"): "one gradient pass, file store streamed (windows "
                                      "of the block files; spark.sparkgd.blockMemory=64m)"}
    for (store, engine), name in names.items():
        lines.append(row(name, results[f"sparkgd_{store}_{engine}_pass_s"],
                         results["numpy_pass_s"], "NumPy"))
        lines.append(row("... against one read of its blocks (the floor)",
                         results[f"sparkgd_{store}_{engine}_pass_s"],
                         results[f"sparkgd_{store}_{engine}_floor_s"], "the same tasks"))
    lines.append(row("streamed pass against the blocks in memory",
                     results["sparkgd_streamed_workers_pass_s"],
                     results["sparkgd_served_served_pass_s"], "served pass"))
    if "spark_ml_fit_s" in results:
        for store, what in (("served", "served store, the default"), ("files", "file store")):
            lines.append(row(f"blocks from Parquet ({what})", results[f"sparkgd_{store}_build_s"],
                             results["spark_ml_build_s"], "Spark ML read+vectorize+cache"))
        lines.append(row("lbfgs fit, tol 1e-8, each library's first fit (cold; sparkgd first)",
                         results["sparkgd_fit_cold_s"], results["spark_ml_fit_cold_s"],
                         "Spark ML LogisticRegression"))
        if args.fit_repeat > 1:
            lines.append(row(f"lbfgs fit, tol 1e-8, best later fit of {args.fit_repeat - 1}"
                             " (warm)", results["sparkgd_fit_s"], results["spark_ml_fit_s"],
                             "Spark ML LogisticRegression"))
        gap = lambda key: results[f"{key}_objective"] - results["scipy_objective"]  # noqa
        lines.append(f"| objective above SciPy's optimum, tol 1e-8 | {gap('sparkgd'):+.1e} | "
                     f"{gap('spark_ml'):+.1e} (Spark ML) | "
                     f"{gap('sparkgd') - gap('spark_ml'):+.1e} |")
        warm = "warm" if args.fit_repeat > 1 else "cold"
        lines.append(row("lbfgs fit, tol 1e-12", results["sparkgd_tol12_fit_s"],
                         results["spark_ml_fit_s"],
                         f"Spark ML LogisticRegression, tol 1e-8, {warm}"))
        lines.append(f"| objective above SciPy's optimum, tol 1e-12 | "
                     f"{gap('sparkgd_tol12'):+.1e} | {gap('spark_ml'):+.1e} (Spark ML, tol "
                     f"1e-8) | {gap('sparkgd_tol12') - gap('spark_ml'):+.1e} |")
    table = "\n".join(lines)
    print(f"\nsparkgd benchmark: {n} x {d}, {args.partitions} partitions, master {sc.master}\n")
    print(table)
    results["table"] = table
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    spark.stop()
    return 0


def memory_only(spark, path, args, raw_bytes, tmp):
    from sparkgd import kernels
    from sparkgd.data import resolve_input
    from sparkgd.engine import Engine
    from sparkgd.modes.sync import DistributedObjective
    from sparkgd.penalties import Penalty

    df = spark.read.parquet(path)
    d = args.features
    layout = kernels.Layout(d, 1, True)
    theta = np.zeros(layout.size)
    with PeakRss(os.getppid()) as mem:
        t0 = time.perf_counter()
        engine = Engine.open(df, resolve_input(df.schema), store=args.store, dtype=args.dtype)
        build = time.perf_counter() - t0
        try:
            obj = DistributedObjective(engine, kernels.make_loss("logistic"), layout,
                                       Penalty(layout))
            t, _ = timed(lambda: obj(theta), args.repeat)
        finally:
            engine.close()
    gib = 2.0 ** 30
    print(f"\nsparkgd memory ({engine._store.kind} store, {args.dtype} blocks): {int(args.rows)} x {d}, raw "
          f"{raw_bytes / gib:.2f} GiB; build {build:.1f}s, pass {t:.3f}s; peak memory (PSS) of "
          f"the whole tree {mem.peak / gib:.2f} GiB ({mem.peak / raw_bytes:.2f}x raw), of which the JVM "
          f"{mem.peak_root / gib:.2f} GiB and Python {(mem.peak - mem.peak_root) / gib:.2f} GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"raw_bytes": raw_bytes, "build_s": build, "pass_s": t,
                       "peak_rss": mem.peak, "peak_rss_jvm": mem.peak_root}, f, indent=2)
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
