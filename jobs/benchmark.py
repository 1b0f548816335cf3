"""Benchmark: sparkgd vs pyspark.ml vs single-process NumPy/SciPy, side by side in one run.

    ./spark-submit.sh --master local[2] --driver-memory 8g jobs/benchmark.py \\
        --rows 1000000 --features 100 --partitions 8 --json bench.json

Generates logistic data (or takes ``--data``), then measures, in this one run:

* build: Spark ML's read + vectorize + cache vs sparkgd's blocks from the Parquet files;
* one full-gradient pass on warm data: NumPy (``X @ w``, then ``X.T @ r``) vs sparkgd's
  distributed evaluation: the default (file store, long-lived serving tasks), the file
  store with one Spark job per pass, and blocks pickled in Spark's cache with one job
  per pass (the plain path);
* a whole L-BFGS fit (tol 1e-8) on a cached DataFrame: Spark ML LogisticRegression vs
  sparkgd, with the objective each reaches (and SciPy on the NumPy arrays);
* peak memory (PSS: RSS with shared pages split) of the JVM and every Python process under it.

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


def timed(fn, repeat=1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv=None):
    p = argparse.ArgumentParser(prog="jobs/benchmark.py")
    p.add_argument("--rows", type=float, default=1e6)
    p.add_argument("--features", type=int, default=100)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--data", default=None, help="existing Parquet data (features, label)")
    p.add_argument("--workdir", default=None, help="where generated data goes (temp dir)")
    p.add_argument("--reg-param", type=float, default=1e-3)
    p.add_argument("--repeat", type=int, default=5, help="timed repetitions of one pass")
    p.add_argument("--skip-spark-ml", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--memory-only", action="store_true",
                   help="only build sparkgd's blocks from the Parquet files and run passes, "
                        "reporting peak memory (PSS): run it in its own spark-submit so nothing "
                        "else has grown the JVM")
    args = p.parse_args(argv)

    from pyspark.sql import SparkSession
    from pyspark.ml.functions import array_to_vector

    import sparkgd
    from sparkgd import kernels
    from sparkgd.comm import Aggregator
    from sparkgd.data import build_blocks, resolve_input
    from sparkgd.modes.sync import DistributedObjective
    from sparkgd.penalties import Penalty

    spark = SparkSession.builder.appName("sparkgd-benchmark").getOrCreate()
    sc = spark.sparkContext
    results = {"master": sc.master, "rows": int(args.rows), "features": args.features,
               "partitions": args.partitions}
    rss = lambda: PeakRss(os.getppid())  # noqa: E731  the spark-submit JVM and its children

    path = args.data
    tmp = None
    if path is None:
        from sparkgd import datagen

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

    # --- single-process NumPy / SciPy --------------------------------------------------
    X, y = numpy_arrays(path)
    n, d = X.shape
    theta = np.random.default_rng(0).normal(size=d + 1) * 0.01
    loss = kernels.make_loss("logistic")
    layout = kernels.Layout(d, 1, True)

    def numpy_pass():
        z = X @ theta[:d] + theta[d]
        r = 1.0 / (1.0 + np.exp(-z)) - y
        return X.T @ r, r.sum()

    results["numpy_pass_s"], _ = timed(numpy_pass, args.repeat)
    f_np = kernels.block_sums(X, y, None, theta, loss, layout)
    print(f"numpy pass: {results['numpy_pass_s']:.4f}s", flush=True)
    del X

    df = spark.read.parquet(path)

    # --- Spark ML ------------------------------------------------------------------------
    if not args.skip_spark_ml:
        from pyspark.ml.classification import LogisticRegression as SparkLR

        with rss() as mem:
            t0 = time.perf_counter()
            vec = df.select(array_to_vector("features").alias("features"), "label").cache()
            vec.count()
            results["spark_ml_build_s"] = time.perf_counter() - t0
            t, ref = timed(lambda: SparkLR(regParam=args.reg_param, standardization=False,
                                           tol=1e-8, maxIter=100).fit(vec))
        results["spark_ml_fit_s"] = t
        results["spark_ml_objective"] = float(ref.summary.objectiveHistory[-1])
        results["spark_ml_iterations"] = int(ref.summary.totalIterations)
        results["spark_ml_peak_rss"] = mem.peak
        print(f"spark ml: build {results['spark_ml_build_s']:.1f}s fit {t:.1f}s "
              f"({results['spark_ml_iterations']} it)", flush=True)
    else:
        vec = df.select(array_to_vector("features").alias("features"), "label").cache()
        vec.count()

    # --- sparkgd ------------------------------------------------------------------------
    spec = resolve_input(df.schema)
    # (store, engine): the plain path (pickled blocks, a Spark job per pass), the file
    # store with a Spark job per pass, and the default (file store, serving tasks).
    engines = {"memory": ("jobs",), "files": ("jobs", "workers")}
    for store in ("memory", "files"):
        with rss() as mem:
            t0 = time.perf_counter()
            blocks = build_blocks(df, spec, store=store)
            results[f"sparkgd_{store}_build_s"] = time.perf_counter() - t0
            try:
                for engine in engines[store]:
                    obj = DistributedObjective(blocks, loss, layout, Penalty(layout),
                                               Aggregator(), engine=engine)
                    obj(theta)  # warm: page cache, Python workers, serving tasks
                    t, (f, g) = timed(lambda: obj(theta), args.repeat)
                    obj.close()
                    assert obj.engine == engine, (engine, obj.engine)
                    results[f"sparkgd_{store}_{engine}_pass_s"] = t
                    assert abs(f - f_np[0] / f_np[1]) <= 1e-10 * abs(f), (f, f_np[0] / f_np[1])
                    print(f"sparkgd[{store}, {engine}]: pass {t:.4f}s", flush=True)
            finally:
                blocks.release()
        results[f"sparkgd_{store}_peak_rss"] = mem.peak
        print(f"sparkgd[{store}]: build {results[f'sparkgd_{store}_build_s']:.1f}s", flush=True)

    with rss() as mem:
        t, model = timed(lambda: sparkgd.LogisticRegression(
            regParam=args.reg_param, tol=1e-8, maxIter=100).fit(vec))
    results["sparkgd_fit_s"] = t
    results["sparkgd_fit_peak_rss"] = mem.peak
    results["sparkgd_objective"] = model.summary.objectiveHistory[-1]
    results["sparkgd_iterations"] = model.summary.totalIterations
    print(f"sparkgd fit: {t:.1f}s ({model.summary.totalIterations} it)", flush=True)
    vec.unpersist()

    # --- the table -----------------------------------------------------------------------
    def row(name, ours, ref, ref_name):
        ratio = ours / ref if ref else float("nan")
        return f"| {name} | {ours:.3f} s | {ref:.3f} s ({ref_name}) | {ratio:.2f}x |"

    lines = ["| measure | sparkgd | reference | ratio |", "| --- | --- | --- | --- |"]
    names = {("files", "workers"): "one gradient pass (default: file store, serving tasks)",
             ("files", "jobs"): "one gradient pass, file store, a Spark job per pass",
             ("memory", "jobs"): "one gradient pass, blocks in Spark's cache, a job per pass"}
    for (store, engine), name in names.items():
        lines.append(row(name, results[f"sparkgd_{store}_{engine}_pass_s"],
                         results["numpy_pass_s"], "NumPy"))
    if "spark_ml_fit_s" in results:
        lines.append(row("blocks from Parquet", results["sparkgd_files_build_s"],
                         results["spark_ml_build_s"], "Spark ML read+vectorize+cache"))
        lines.append(row("lbfgs fit, tol 1e-8", results["sparkgd_fit_s"],
                         results["spark_ml_fit_s"], "Spark ML LogisticRegression"))
        lines.append(f"| final objective | {results['sparkgd_objective']:.12g} | "
                     f"{results['spark_ml_objective']:.12g} (Spark ML) | "
                     f"{results['sparkgd_objective'] - results['spark_ml_objective']:+.2e} |")
    gib = 2.0 ** 30
    lines.append(f"| peak memory (PSS) (files store build+passes) | "
                 f"{results['sparkgd_files_peak_rss'] / gib:.2f} GiB | raw data "
                 f"{raw_bytes / gib:.2f} GiB | "
                 f"{results['sparkgd_files_peak_rss'] / raw_bytes:.2f}x |")
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
    from sparkgd.comm import Aggregator
    from sparkgd.data import build_blocks, resolve_input
    from sparkgd.modes.sync import DistributedObjective
    from sparkgd.penalties import Penalty

    df = spark.read.parquet(path)
    d = args.features
    layout = kernels.Layout(d, 1, True)
    theta = np.zeros(layout.size)
    with PeakRss(os.getppid()) as mem:
        t0 = time.perf_counter()
        blocks = build_blocks(df, resolve_input(df.schema))
        build = time.perf_counter() - t0
        try:
            obj = DistributedObjective(blocks, kernels.make_loss("logistic"), layout,
                                       Penalty(layout), Aggregator())
            t, _ = timed(lambda: obj(theta), args.repeat)
        finally:
            blocks.release()
    gib = 2.0 ** 30
    print(f"\nsparkgd memory: {int(args.rows)} x {d}, raw {raw_bytes / gib:.2f} GiB; build "
          f"{build:.1f}s, pass {t:.3f}s; peak memory (PSS) of the whole tree "
          f"{mem.peak / gib:.2f} GiB ({mem.peak / raw_bytes:.2f}x raw), of which the JVM "
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
