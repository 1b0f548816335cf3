"""The README's main job end to end against the same job written with Spark ML.

    .venv/bin/python jobs/bench_job.py --rows 1000000 --features 100 --pairs 3

Each run is a fresh application (``./spark-submit.sh``, ``local[*]``), as a user runs it:

* sparkgd: ``jobs/train.py --data D --reg-param 1e-3 --tol 1e-8 --max-iter 200
  --output O`` (fit, save, print the training metrics);
* Spark ML: ``jobs/bench_job.py --spark-ml`` run the same way: read the Parquet,
  ``array_to_vector``, ``LogisticRegression(regParam, tol, maxIter, standardization=False)``
  (sparkgd's objective), fit, save, print the same training metrics from its summary
  (areaUnderROC, accuracy, weightedFMeasure, logLoss).

Runs are paired (sparkgd then Spark ML, then the other way round) so both see the
same background; for each: wall seconds, CPU seconds of the whole process tree (the
JVM, its Python workers, the driver), peak memory (PSS summed over the tree), and
where the seconds went, from the job's own timestamped lines. The table gives the
medians and the ratios sparkgd / Spark ML.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def spark_ml_job(argv):
    """The reference job (run under spark-submit): Spark ML's LogisticRegression on the
    same data and objective, the same outputs."""
    p = argparse.ArgumentParser()
    p.add_argument("--spark-ml", action="store_true")
    p.add_argument("--data", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--reg-param", type=float, default=1e-3)
    p.add_argument("--tol", type=float, default=1e-8)
    p.add_argument("--max-iter", type=int, default=200)
    args = p.parse_args(argv)
    from pyspark.ml.classification import LogisticRegression
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import SparkSession

    start = time.perf_counter()
    spark = SparkSession.builder.appName("spark-ml-job").getOrCreate()
    print(f"spark-ml: session {time.perf_counter() - start:.2f}s", flush=True)
    df = spark.read.parquet(args.data).select(
        array_to_vector("features").alias("features"), "label")
    t = time.perf_counter()
    model = LogisticRegression(regParam=args.reg_param, tol=args.tol, maxIter=args.max_iter,
                               standardization=False).fit(df)
    s = model.summary
    print(f"spark-ml: done: {s.totalIterations} iterations, objective "
          f"{s.objectiveHistory[-1]:.12g}, {time.perf_counter() - t:.2f}s fit", flush=True)
    t = time.perf_counter()
    model.write().overwrite().save(args.output)
    print(f"spark-ml: saved in {time.perf_counter() - t:.2f}s", flush=True)
    t = time.perf_counter()
    line = (f"areaUnderROC {s.areaUnderROC:.6g}, accuracy {s.accuracy:.6g}, "
            f"weightedFMeasure {s.weightedFMeasure():.6g}")
    print(f"spark-ml: training metrics: {line} ({time.perf_counter() - t:.2f}s)", flush=True)
    spark.stop()
    return 0


def run_job(cmd, log):
    """Run ``cmd``: wall seconds, peak PSS of its process tree (``benchmark.PeakRss``),
    and its output lines with the second each arrived at (CPU: the caller's
    ``RUSAGE_CHILDREN`` before and after)."""
    from benchmark import PeakRss

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = []
    with PeakRss(proc.pid) as mem:
        for line in proc.stdout:
            lines.append((time.perf_counter() - t0, line.rstrip()))
            log.write(f"{lines[-1][0]:7.2f} {line}")
        proc.wait()
    return {"rc": proc.returncode, "wall": time.perf_counter() - t0, "peak": mem.peak,
            "lines": lines, "children_cpu": resource.getrusage(resource.RUSAGE_CHILDREN)}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--spark-ml" in argv:
        return spark_ml_job(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--features", type=int, default=100)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--data", default=None, help="existing Parquet (features, label)")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    tmp = tempfile.mkdtemp(prefix="sparkgd-job-", dir=args.workdir)
    try:
        data = args.data
        if data is None:
            from sparkgd import datagen

            data = os.path.join(tmp, "data")
            datagen.write_dataset(data, task="binary", rows=args.rows, features=args.features,
                                  partitions=args.partitions)
        common = ["--data", data, "--reg-param", "1e-3", "--tol", "1e-8", "--max-iter", "200"]
        jobs = {"sparkgd": ["./spark-submit.sh", "jobs/train.py"] + common,
                "spark_ml": ["./spark-submit.sh", "jobs/bench_job.py", "--spark-ml"] + common}
        runs = {k: [] for k in jobs}
        log = open(os.path.join(args.workdir or ".", "bench_job.log"), "w")
        for pair in range(args.pairs):
            order = list(jobs) if pair % 2 == 0 else list(jobs)[::-1]
            for key in order:
                out = os.path.join(tmp, f"{key}-{pair}")
                log.write(f"=== {key} pair {pair}\n")
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                r = run_job(jobs[key] + ["--output", out], log)
                after = r.pop("children_cpu")
                r["cpu"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
                if r["rc"] != 0:
                    print("\n".join(line for _, line in r["lines"][-20:]))
                    raise SystemExit(f"{key} exited {r['rc']}")
                runs[key].append(r)
                shutil.rmtree(out, ignore_errors=True)
                marks = [f"{t:.1f}s {line[:90]}" for t, line in r["lines"]
                         if line.startswith(("sparkgd:", "spark-ml:"))]
                print(f"{key} pair {pair + 1}: {r['wall']:.2f}s wall, {r['cpu']:.1f}s CPU, "
                      f"peak {r['peak'] / 2**30:.2f} GiB", flush=True)
                for m in marks:
                    print("    " + m, flush=True)
        log.close()

        def med(key, field):
            vals = sorted(r[field] for r in runs[key])
            return vals[len(vals) // 2]

        print("\n| job (fresh application, local[*]) | sparkgd | Spark ML | ratio |")
        print("| --- | --- | --- | --- |")
        for field, name, unit in (("wall", "wall seconds (median)", 1),
                                  ("cpu", "CPU seconds of the process tree", 1),
                                  ("peak", "peak memory GiB (PSS)", 2**30)):
            a, b = med("sparkgd", field) / unit, med("spark_ml", field) / unit
            print(f"| {name} | {a:.2f} | {b:.2f} | {a / b:.2f}x |")
        # Spark ML's job up to its saved model, without the training metrics it prints
        # after (its summary evaluates them in further Spark jobs over the input)
        for r in runs["spark_ml"]:
            r["until_saved"] = next(t for t, line in r["lines"]
                                    if line.startswith("spark-ml: saved"))
        a, b = med("sparkgd", "wall"), med("spark_ml", "until_saved")
        print(f"| wall seconds, Spark ML until its model is saved (no metrics) | {a:.2f} | "
              f"{b:.2f} | {a / b:.2f}x |")
        walls = [a["wall"] / b["wall"] for a, b in zip(runs["sparkgd"], runs["spark_ml"])]
        print("pairwise wall ratios: " + ", ".join(f"{w:.2f}" for w in walls))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(runs, f, indent=2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
