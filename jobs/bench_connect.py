"""Benchmark: a fit from a Spark Connect session, sparkgd vs Spark ML, side by side.

    .venv/bin/python jobs/bench_connect.py [--master 'local[2]'] [--rows 200000 --features 50]

Not through spark-submit: a Connect client is a plain Python process. It starts a local
Spark Connect server (``SparkSession.builder.remote(master)``, pyspark's own jars), then
on each data set -- the bundled breast-cancer data (real, 569 x 30) and generated
logistic data of ``--rows`` x ``--features`` -- fits ``LogisticRegression(regParam,
tol=1e-8, standardization=False)`` with sparkgd and with Spark ML, alternately: each
library's first fit on the data ("cold") and the best of ``--repeat`` later ones
("warm"). Every model's objective is evaluated by one NumPy function and compared with
SciPy's L-BFGS-B optimum on the same arrays. Prints a table (ratio: sparkgd / Spark ML,
below 1 is faster) and writes JSON with ``--json``. Machines are shared and noisy:
compare ratios within one run.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def arrays(path):
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    return np.array(t.column("features").to_pylist()), t.column("label").to_numpy()


def objective(theta, X, y, reg):
    z = X @ theta[:-1] + theta[-1]
    return float(np.mean(np.logaddexp(0, z) - y * z) + 0.5 * reg * theta[:-1] @ theta[:-1])


def optimum(X, y, reg):
    from scipy.optimize import minimize

    s = np.r_[X.std(axis=0), 1.0]

    def fun(v):
        theta = v / s
        z = X @ theta[:-1] + theta[-1]
        p = 1 / (1 + np.exp(-z))
        g = np.r_[X.T @ (p - y) / len(y) + reg * theta[:-1], np.mean(p - y)]
        return objective(theta, X, y, reg), g / s

    res = minimize(fun, np.zeros(X.shape[1] + 1), jac=True, method="L-BFGS-B",
                   options={"ftol": 1e-16, "gtol": 1e-12, "maxiter": 100000, "maxfun": 200000})
    return res.fun


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--master", default="local[2]")
    p.add_argument("--rows", type=int, default=200000)
    p.add_argument("--features", type=int, default=50)
    p.add_argument("--reg-param", type=float, default=0.01)
    p.add_argument("--repeat", type=int, default=2, help="later fits each (warm: the best)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.ml.classification import LogisticRegression as SparkLR
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import SparkSession

    import sparkgd

    work = tempfile.mkdtemp(prefix="sparkgd-bench-connect-")
    generated = os.path.join(work, "generated")
    subprocess_args = [sys.executable, os.path.join(ROOT, "data", "generate.py"), generated,
                       "--task", "binary", "--rows", str(args.rows), "--features",
                       str(args.features), "--partitions", "8", "--seed", "5", "--format",
                       "array"]
    import subprocess

    subprocess.run(subprocess_args, check=True, capture_output=True)
    spark = SparkSession.builder.remote(args.master).getOrCreate()
    sets = [("breast cancer 569 x 30", os.path.join(ROOT, "data", "breast_cancer")),
            (f"generated {args.rows} x {args.features}", generated)]
    results = {"master": args.master, "regParam": args.reg_param, "sets": []}
    for name, path in sets:
        X, y = arrays(path)
        f_star = optimum(X, y, args.reg_param)
        df = spark.read.parquet(path).cache()
        df.count()
        vdf = df.withColumn("features", array_to_vector("features")).cache()
        vdf.count()
        times = {"sparkgd": [], "spark_ml": []}
        gaps = {}
        for r in range(1 + args.repeat):
            for who in ("sparkgd", "spark_ml"):
                t = time.perf_counter()
                if who == "sparkgd":
                    m = sparkgd.LogisticRegression(regParam=args.reg_param, tol=1e-8).fit(df)
                    theta = np.r_[m.coefficients, m.intercept]
                else:
                    m = SparkLR(regParam=args.reg_param, tol=1e-8,
                                standardization=False).fit(vdf)
                    theta = np.r_[m.coefficients.toArray(), m.intercept]
                times[who].append(time.perf_counter() - t)
                gaps[who] = objective(theta, X, y, args.reg_param) - f_star
        row = {"data": name, "cold": {k: v[0] for k, v in times.items()},
               "warm": {k: min(v[1:]) for k, v in times.items()}, "gap": gaps}
        results["sets"].append(row)
        df.unpersist()
        vdf.unpersist()
    spark.stop()
    print(f"\nsparkgd vs Spark ML from a Spark Connect session ({args.master}), "
          f"LogisticRegression regParam {args.reg_param}, tol 1e-8\n")
    print("| data | fit | sparkgd | Spark ML | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for row in results["sets"]:
        for kind in ("cold", "warm"):
            a, b = row[kind]["sparkgd"], row[kind]["spark_ml"]
            label = "first fit" if kind == "cold" else f"best of {args.repeat} later"
            print(f"| {row['data']} | {label} | {a:.2f} s | {b:.2f} s | {a / b:.2f}x |")
        print(f"| {row['data']} | objective above SciPy's optimum | "
              f"{row['gap']['sparkgd']:+.1e} | {row['gap']['spark_ml']:+.1e} | |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
