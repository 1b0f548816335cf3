"""benchmark.py --crypto: a pass with Spark's encryption on against one without.

    ./spark-submit.sh --master 'local[2]' --driver-memory 8g jobs/benchmark.py --crypto \\
        --rows 1000000 --features 100 --partitions 8 --repeat 7

This application (Spark's encryption as its session has it: off by default) measures a
served pass (``DistributedObjective`` over ``Engine.open``, the best of ``--repeat``
passes, two rounds) and a fixed-step gd fit; then it runs itself again as a child
application with ``spark.authenticate=true`` and ``spark.network.crypto.enabled=true``
on the same data, which measures the same. Both fits run over sparkgd's sealed wire
(``summary.engine``): Spark's encryption no longer sends the passes to one Spark job
each (3.4x slower at 1M x 100 before). Prints the two side by side with the ratio, and
how far apart the two models are.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def measure(spark, path, repeat):
    """-> {pass_s, engine, theta, f, fit_s} in this application."""
    import sparkgd
    from sparkgd import kernels
    from sparkgd.data import resolve_input
    from sparkgd.engine import Engine
    from sparkgd.modes.sync import DistributedObjective
    from sparkgd.penalties import Penalty

    df = spark.read.parquet(path)
    spec = resolve_input(df.schema)
    d = len(df.first()["features"])
    layout = kernels.Layout(d, 1, True)
    theta = np.random.default_rng(0).normal(size=layout.size) * 0.01
    engine = Engine.open(df, spec)
    try:
        obj = DistributedObjective(engine, kernels.make_loss("logistic"), layout,
                                   Penalty(layout))
        obj(theta)
        best = float("inf")
        for _ in range(2):
            time.sleep(0.3)
            for _ in range(repeat):
                t = time.perf_counter()
                f, _ = obj(theta)
                best = min(best, time.perf_counter() - t)
        kind = engine.description
    finally:
        engine.close()
    t = time.perf_counter()
    model = sparkgd.LogisticRegression(optimizer="gd", stepSize=0.5, maxIter=30, tol=0.0,
                                       regParam=1e-3).fit(df)
    fit_s = time.perf_counter() - t
    return {"pass_s": best, "engine": kind, "f": float(f), "fit_s": fit_s,
            "fit_engine": model.summary.engine,
            "theta": np.r_[model.coefficients, model.intercept].tolist()}


def run(spark, args):
    from sparkgd import datagen

    sc = spark.sparkContext
    work = tempfile.mkdtemp(prefix="sparkgd-bench-crypto-", dir=args.workdir)
    path = args.data or os.path.join(work, "data")
    if not args.data:
        datagen.write_dataset(path, task="binary", rows=int(args.rows),
                              features=args.features, partitions=args.partitions)
    plain = measure(spark, path, args.repeat)
    print(f"this application ({plain['engine']}): pass {plain['pass_s']:.4f}s", flush=True)
    child_json = os.path.join(work, "encrypted.json")
    memory = sc.getConf().get("spark.driver.memory", "4g")
    cmd = [os.path.join(ROOT, "spark-submit.sh"), "--master", sc.master, "--driver-memory",
           memory, "--conf", "spark.authenticate=true", "--conf",
           "spark.network.crypto.enabled=true", os.path.join(HERE, "benchmark.py"),
           "--crypto-child", "--data", path, "--repeat", str(args.repeat), "--json",
           child_json]
    # a fresh application: not this driver's environment (spark-submit set its
    # PYTHONPATH, SPARK_HOME and gateway for it)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYSPARK_", "SPARK_"))
           and k != "PYTHONPATH"}
    run_ = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if run_.returncode != 0:
        print(run_.stdout[-3000:], run_.stderr[-3000:], file=sys.stderr)
        return 1
    with open(child_json) as f:
        enc = json.load(f)
    diff = float(np.max(np.abs(np.array(enc["theta"]) - np.array(plain["theta"]))))
    print(f"\nsparkgd with Spark's encryption on and off: {int(args.rows)} x {args.features}, "
          f"{args.partitions} partitions, master {sc.master}\n")
    print("| measure | Spark encrypts (authenticate + network.crypto) | no Spark encryption "
          "| ratio |")
    print("| --- | --- | --- | --- |")
    print(f"| one gradient pass | {enc['pass_s']:.4f} s ({enc['engine']}) | "
          f"{plain['pass_s']:.4f} s ({plain['engine']}) | "
          f"{enc['pass_s'] / plain['pass_s']:.2f}x |")
    print(f"| gd fit, 30 iterations | {enc['fit_s']:.2f} s ({enc['fit_engine']}) | "
          f"{plain['fit_s']:.2f} s ({plain['fit_engine']}) | "
          f"{enc['fit_s'] / plain['fit_s']:.2f}x |")
    print(f"| largest coefficient difference | {diff:.1e} | | |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"plain": plain, "encrypted": enc, "max_diff": diff}, f, indent=2)
    return 0


def child(spark, args):
    out = measure(spark, args.data, args.repeat)
    with open(args.json, "w") as f:
        json.dump(out, f)
    return 0
