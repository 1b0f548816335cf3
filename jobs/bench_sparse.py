"""``jobs/benchmark.py --sparse``: sparse, high-dimensional logistic regression.

    ./spark-submit.sh --master local[2] --driver-memory 8g jobs/benchmark.py --sparse \\
        --rows 20000 --features 1000000 --nnz-per-row 100 --reg-param 1e-3

Writes LIBSVM text (``nnz-per-row`` distinct features a row, values N(0, value-scale^2),
labels from a logistic model), then on the same rows:

* SciPy's L-BFGS-B on the raw CSR matrix in this one process: the optimum F* (run until
  it can go no lower), and the iterations and seconds it takes to 1e-6 of F*;
* sparkgd: ``LogisticRegression(optimizer="lbfgs")`` on ``read_libsvm`` (the tasks parse
  the text and serve CSR blocks), first fit and a second one (warm); iterations to 1e-6
  of F* from its objective history, time per pass (an evaluation of F and its
  gradient: L-BFGS-B takes more than one an iteration only in a line search, and runs
  many at the end, when F no longer changes in its last digits);
* Spark ML: ``LogisticRegression(standardization=False)`` on
  ``spark.read.format("libsvm")`` cached, ``--spark-ml-iter`` iterations (tol 0): its gap
  to F* (one NumPy function evaluates every model), time per iteration;
* the peak memory (PSS) of the JVM and every Python process under it, per library.

Prints a table with the ratios sparkgd / Spark ML and writes JSON with ``--json``.
"""
import json
import os
import time

import numpy as np


def write_data(path, rows, d, k, scale, seed=0, files=4):
    """LIBSVM part files; returns the same rows as (CSR, labels)."""
    import scipy.sparse as sp

    from sparkgd import datagen

    rng = np.random.default_rng(seed)
    beta = rng.normal(0.0, 3.0, d)
    os.makedirs(path, exist_ok=True)
    Xs, ys = [], []
    per = -(-rows // files)
    for f in range(files):
        n = min(per, rows - f * per)
        if n <= 0:
            break
        idx = datagen._row_indices(rng, n, d, k)
        vals = rng.normal(0.0, scale, size=(n, k))
        z = np.einsum("ij,ij->i", vals, beta[idx]) + 0.3
        y = (rng.random(n) < 1.0 / (1.0 + np.exp(-z))).astype(np.float64)
        lines = datagen._libsvm_lines(idx, vals, y, "binary")
        with open(os.path.join(path, f"part-{f:05d}.libsvm"), "wb") as fh:
            datagen._write_strings(fh, lines)
        Xs.append(sp.csr_matrix((vals.ravel(), idx.ravel(), np.arange(0, n * k + 1, k)),
                                shape=(n, d)))
        ys.append(y)
    return sp.vstack(Xs, format="csr"), np.concatenate(ys)


def objective(X, y, reg):
    n = y.shape[0]

    def f(theta):
        beta, b = theta[:-1], theta[-1]
        z = X @ beta + b
        r = (0.5 * (1.0 + np.tanh(0.5 * z)) - y) / n
        val = np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * reg * beta @ beta
        return float(val), np.r_[X.T @ r + reg * beta, r.sum()]

    return f


def first_within(history, fstar, gap, times=None):
    """(iterations, seconds) to the first entry within ``gap`` (relative) of F*."""
    for i, v in enumerate(history):
        if v - fstar <= gap * abs(fstar):
            return i + 1, (None if times is None else times[i])
    return None, None


def scipy_run(fun, size, fstar=None, maxiter=500):
    from scipy.optimize import minimize

    hist, times = [], []
    t0 = time.perf_counter()

    def cb(intermediate_result):
        hist.append(float(intermediate_result.fun))
        times.append(time.perf_counter() - t0)

    res = minimize(fun, np.zeros(size), jac=True, method="L-BFGS-B", callback=cb,
                   options={"ftol": 0.0, "gtol": 1e-12, "maxiter": maxiter, "maxcor": 10})
    return float(res.fun), hist, times, time.perf_counter() - t0


def theta_of(model):
    coef = model.coefficients
    coef = coef.toArray() if hasattr(coef, "toArray") else np.asarray(coef)
    return np.r_[np.asarray(coef).ravel(), model.intercept]


def run(spark, args, peak_rss):
    import sparkgd
    from sparkgd.data import read_libsvm

    rows, d, k = int(args.rows), int(args.features), int(args.nnz_per_row)
    reg = args.reg_param
    path = os.path.join(args.tmp, "sparse")
    t = time.perf_counter()
    X, y = write_data(path, rows, d, k, args.value_scale)
    print(f"generated {rows} x {d} LIBSVM ({k} non-zeros a row, values N(0, "
          f"{args.value_scale:g}^2)) in {time.perf_counter() - t:.1f}s at {path}", flush=True)
    fun = objective(X, y, reg)

    fstar, hist, times, secs = scipy_run(fun, d + 1)
    fstar = min([fstar] + hist)
    it6, t6 = first_within(hist, fstar, 1e-6, times)
    res = {"rows": rows, "features": d, "nnz_per_row": k, "reg_param": reg, "fstar": fstar,
           "scipy": {"iterations": len(hist), "seconds": secs, "iter_to_1e-6": it6,
                     "seconds_to_1e-6": t6, "per_iteration": secs / max(len(hist), 1)}}
    print(f"SciPy L-BFGS-B: F* = {fstar:.15g} after {len(hist)} iterations ({secs:.2f}s); "
          f"1e-6 at iteration {it6} ({t6:.2f}s)", flush=True)

    def sparkgd_fit():
        df = read_libsvm(spark, path, num_features=d)
        est = sparkgd.LogisticRegression(regParam=reg, tol=0.0, maxIter=args.sparkgd_iter)
        t0 = time.perf_counter()
        with peak_rss() as mem:
            model = est.fit(df)
        wall = time.perf_counter() - t0
        s = model.summary
        gap = (fun(theta_of(model))[0] - fstar) / abs(fstar)
        it, _ = first_within(s.objectiveHistory, fstar, 1e-6)
        return {"wall": wall, "training": s.trainingSeconds, "iterations": s.totalIterations,
                "evaluations": s.numEvaluations, "iter_to_1e-6": it, "gap": gap,
                "peak_bytes": mem.peak,
                "per_pass": s.trainingSeconds / max(s.numEvaluations, 1)}

    res["sparkgd_cold"] = sparkgd_fit()
    res["sparkgd_warm"] = sparkgd_fit()
    for name in ("sparkgd_cold", "sparkgd_warm"):
        r = res[name]
        print(f"{name}: {r['wall']:.2f}s wall ({r['training']:.2f}s training, "
              f"{r['iterations']} iterations, {r['evaluations']} passes, "
              f"{r['per_pass']:.3f}s each); 1e-6 at "
              f"iteration {r['iter_to_1e-6']}; final gap {r['gap']:.2e}; peak "
              f"{r['peak_bytes'] / 2**30:.2f} GiB", flush=True)

    if not args.skip_spark_ml:
        from pyspark.ml.classification import LogisticRegression as SparkLR

        t0 = time.perf_counter()
        with peak_rss() as mem:
            cached = spark.read.format("libsvm").option("numFeatures", str(d)).load(path) \
                .cache()
            cached.count()
            load = time.perf_counter() - t0
            t1 = time.perf_counter()
            model = SparkLR(regParam=reg, standardization=False, maxIter=args.spark_ml_iter,
                            tol=0.0).fit(cached)
            fit = time.perf_counter() - t1
        iters = model.summary.totalIterations
        gap = (fun(theta_of(model))[0] - fstar) / abs(fstar)
        res["spark_ml"] = {"load_and_cache": load, "fit": fit, "iterations": iters,
                           "per_iteration": fit / max(iters, 1), "gap": gap,
                           "peak_bytes": mem.peak}
        cached.unpersist()
        print(f"Spark ML: load+cache {load:.2f}s, fit {fit:.2f}s ({iters} iterations, "
              f"{fit / max(iters, 1):.3f}s each); final gap {gap:.2e}; peak "
              f"{mem.peak / 2**30:.2f} GiB", flush=True)
    table(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


def table(res):
    sc, warm, ml = res["scipy"], res["sparkgd_warm"], res.get("spark_ml")
    print()
    print(f"{'':34s} {'SciPy (1 process)':>18s} {'sparkgd':>12s} {'Spark ML':>12s} "
          f"{'sparkgd/ML':>11s}")

    def line(name, a, b, c, ratio=True):
        def fmt(v):
            return "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))
        ratio = f"{b / c:.2f}x" if ratio and isinstance(b, float) and isinstance(c, float) \
            and c else ""
        print(f"{name:34s} {fmt(a):>18s} {fmt(b):>12s} {fmt(c):>12s} {ratio:>11s}")

    line("iterations to 1e-6 of F*", sc["iter_to_1e-6"], warm["iter_to_1e-6"],
         None if ml is None else (None if ml["gap"] > 1e-6 else "<=" + str(ml["iterations"])))
    line("gap to F* at the end (relative)", 0.0, warm["gap"],
         None if ml is None else ml["gap"], ratio=False)
    line("iterations run", sc["iterations"], warm["iterations"],
         None if ml is None else ml["iterations"])
    line("seconds per pass (warm; ML: per iteration)", sc["per_iteration"], warm["per_pass"],
         None if ml is None else ml["per_iteration"])
    line("fit seconds, first (incl. blocks)", None, res["sparkgd_cold"]["wall"],
         None if ml is None else ml["load_and_cache"] + ml["fit"])
    line("fit seconds, warm (incl. blocks)", None, warm["wall"], None)
    line("peak memory GiB (JVM + Python)", None, warm["peak_bytes"] / 2**30,
         None if ml is None else ml["peak_bytes"] / 2**30)


def run_hashed(spark, args, peak_rss):
    """``--hashed-bits 24,28``: click-log-shaped rows (``--rows``, 40 categorical fields,
    Zipf values, one-hot, hashed into 2^bits columns: :func:`sparkgd.datagen.write_hashed`)
    as LIBSVM text. For each width: SciPy's L-BFGS-B on the columns the rows touch (F*;
    iterations and seconds an iteration), sparkgd ``lbfgs`` (first and warm fit: seconds
    an evaluation, iterations to 1e-6 of F*, the gap at the end, peak memory of the JVM
    and every Python process), Spark ML (``--spark-ml-iter`` iterations on
    ``format("libsvm")`` with numFeatures 2^bits, cached: seconds an iteration, its gap,
    peak memory; not at 2^28, where its dense vectors are 2 GB each)."""
    import sparkgd
    from sparkgd import datagen
    from sparkgd.data import read_libsvm

    out = {}
    reg = args.reg_param
    for bits in args.hashed_bits:
        path = os.path.join(args.tmp, f"hashed{bits}")
        t = time.perf_counter()
        X, y = datagen.write_hashed(path, rows=int(args.rows), bits=bits)
        cols = np.unique(X.indices)
        Xc = X[:, cols]
        del X
        print(f"2^{bits}: {int(args.rows)} rows, {Xc.nnz} non-zeros, {cols.size} columns "
              f"touched, written in {time.perf_counter() - t:.1f}s", flush=True)
        fun = objective(Xc, y, reg)
        fstar, hist, times, secs = scipy_run(fun, cols.size + 1)
        fstar = min([fstar] + hist)
        it6, _ = first_within(hist, fstar, 1e-6, times)
        res = {"bits": bits, "columns": int(cols.size), "fstar": fstar,
               "scipy": {"iterations": len(hist), "per_iteration": secs / max(len(hist), 1),
                         "iter_to_1e-6": it6}}

        def full_theta(model):
            coef = np.asarray(model.coefficients)
            return np.r_[coef[cols], model.intercept]

        def fit():
            df = read_libsvm(spark, path, num_features=1 << bits)
            est = sparkgd.LogisticRegression(regParam=reg, tol=1e-12, maxIter=200)
            t0 = time.perf_counter()
            with peak_rss() as mem:
                model = est.fit(df)
            s = model.summary
            it, _ = first_within(s.objectiveHistory, fstar, 1e-6)
            return {"wall": time.perf_counter() - t0,
                    "per_eval": s.trainingSeconds / max(s.numEvaluations, 1),
                    "evaluations": s.numEvaluations, "iter_to_1e-6": it,
                    "gap": (fun(full_theta(model))[0] - fstar) / abs(fstar),
                    "peak_bytes": mem.peak, "width": model.numFeatures}

        res["sparkgd_cold"], res["sparkgd_warm"] = fit(), fit()
        if bits <= 24 and not args.skip_spark_ml:
            from pyspark.ml.classification import LogisticRegression as SparkLR

            with peak_rss() as mem:
                cached = spark.read.format("libsvm").option("numFeatures", str(1 << bits)) \
                    .load(path).cache()
                cached.count()
                t1 = time.perf_counter()
                model = SparkLR(regParam=reg, standardization=False,
                                maxIter=args.spark_ml_iter, tol=0.0).fit(cached)
                fit_s = time.perf_counter() - t1
            coef = model.coefficients.toArray()
            gap = (fun(np.r_[coef[cols], model.intercept])[0] - fstar) / abs(fstar)
            iters = model.summary.totalIterations
            res["spark_ml"] = {"per_iteration": fit_s / max(iters, 1), "iterations": iters,
                               "gap": gap, "peak_bytes": mem.peak}
            cached.unpersist()
        out[bits] = res
        w = res["sparkgd_warm"]
        print(f"2^{bits}: sparkgd {w['per_eval']:.3f}s an evaluation, 1e-6 at iteration "
              f"{w['iter_to_1e-6']}, gap {w['gap']:.1e}, peak {w['peak_bytes'] / 2**30:.2f} "
              f"GiB; " + (f"Spark ML {res['spark_ml']['per_iteration']:.2f}s an iteration, "
                          f"gap {res['spark_ml']['gap']:.1e} after "
                          f"{res['spark_ml']['iterations']}" if "spark_ml" in res else
                          "Spark ML not run"), flush=True)
    print("\n| width | columns touched | SciPy s/iteration (touched columns) | SciPy its to "
          "1e-6 | sparkgd s/evaluation | its to 1e-6 | gap at the end | Spark ML s/iteration "
          "| ratio | Spark ML gap | peak GiB sparkgd / Spark ML |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for bits, res in out.items():
        w, ml, sc = res["sparkgd_warm"], res.get("spark_ml"), res["scipy"]
        ratio = f"{w['per_eval'] / ml['per_iteration']:.3f}x" if ml else "-"
        print(f"| 2^{bits} | {res['columns']} | {sc['per_iteration']:.3f} | "
              f"{sc['iter_to_1e-6']} | {w['per_eval']:.3f} | {w['iter_to_1e-6']} | "
              f"{w['gap']:.1e} | {ml['per_iteration'] if ml else '-'} | {ratio} | "
              f"{ml['gap'] if ml else '-'} | {w['peak_bytes'] / 2**30:.2f} / "
              f"{ml['peak_bytes'] / 2**30 if ml else '-'} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({str(k): v for k, v in out.items()}, f, indent=2)
    return out
