"""``jobs/benchmark.py --dp``: held-out accuracy of DP-SGD against epsilon.

    ./spark-submit.sh --master 'local[2]' --driver-memory 4g jobs/benchmark.py --dp

Two data sets:

* generated logistic data, ``--rows`` x ``--features`` (default 200,000 x 50), each
  feature row scaled to L2 norm <= 1, 80/20 train/test split: the non-private optimum
  (lbfgs) and DP-SGD at epsilon 0.1, 0.3, 1, 3, 10 (delta ``--dp-delta``, 1e-5);
* scikit-learn's breast-cancer data (569 rows, standardized on the training part,
  70/30 split), epsilon 1, delta 1e-5, ``--dp-runs`` runs (each its own split seed and
  noise): where DP hurts most, for lack of rows.

Both with the settings the README recommends (``--dp-*`` options), and beside IBM's
diffprivlib ``LogisticRegression`` (objective perturbation) on the same splits when it
is installed (``pip install 'sparkgd[bench]'``: an optional dependency of this benchmark
only). Prints tables; writes JSON with ``--json``.
"""
import os
import statistics
import time

import numpy as np


def _frame(spark, path, X, y):
    import pyarrow as pa
    import pyarrow.parquet as pq

    offsets = pa.array(np.arange(0, X.size + 1, X.shape[1], dtype=np.int32))
    table = pa.table({"features": pa.ListArray.from_arrays(offsets, pa.array(X.ravel())),
                      "label": pa.array(y)})
    os.makedirs(path, exist_ok=True)
    pq.write_table(table, os.path.join(path, "part-0.parquet"))
    return spark.read.parquet(path)


def _accuracy(model, X, y):
    z = X @ model.coefficients + model.intercept
    return float(np.mean((z > 0) == (y == 1)))


def _generated(rows, d, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, d)) / np.sqrt(d)
    X /= np.maximum(1.0, np.linalg.norm(X, axis=1))[:, None]
    beta = rng.normal(size=d) * 3.0
    y = (rng.random(rows) < 1 / (1 + np.exp(-(X @ beta + 0.2)))).astype(float)
    cut = int(0.8 * rows)
    return X[:cut], y[:cut], X[cut:], y[cut:]


def _diffprivlib(eps, delta, X, y, Xt, yt, data_norm, seed):
    try:
        import warnings

        from diffprivlib.models import LogisticRegression as DPLR
    except ImportError:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = DPLR(epsilon=eps, data_norm=data_norm, random_state=seed, max_iter=1000)
        m.fit(X, y)
    return float(m.score(Xt, yt))


def run(spark, args):
    from sparkgd import LogisticRegression

    results = {"generated": [], "breast_cancer": None}
    rows, d = int(args.dp_rows), int(args.dp_features)
    X, y, Xt, yt = _generated(rows, d)
    train = _frame(spark, os.path.join(args.tmp, "train"), X, y)
    train = train.cache()
    train.count()
    print(f"generated {rows} x {d} (rows scaled to norm <= 1), train {len(y)}, test "
          f"{len(yt)}", flush=True)
    t = time.perf_counter()
    plain = LogisticRegression(regParam=args.reg_param, tol=1e-9, maxIter=200).fit(train)
    base = _accuracy(plain, Xt, yt)
    print(f"  non-private (lbfgs): test accuracy {base:.4f} ({time.perf_counter() - t:.1f}s)",
          flush=True)
    results["generated"].append({"epsilon": None, "accuracy": base})
    dp = dict(optimizer=args.dp_optimizer, stepSize=args.dp_step, maxIter=args.dp_steps,
              miniBatchFraction=args.dp_q, maxGradNorm=args.dp_clip, dpDelta=args.dp_delta,
              regParam=args.reg_param)
    for eps in (0.1, 0.3, 1.0, 3.0, 10.0):
        t = time.perf_counter()
        m = LogisticRegression(dpEpsilon=eps, **dp).fit(train)
        acc, p = _accuracy(m, Xt, yt), m.summary.privacy
        other = _diffprivlib(eps, args.dp_delta, X, y, Xt, yt, 1.0, 0)
        results["generated"].append({"epsilon": eps, "accuracy": acc, "spent": p["epsilon"],
                                     "sigma": p["noiseMultiplier"], "diffprivlib": other,
                                     "seconds": time.perf_counter() - t})
        print(f"  epsilon {eps:>4g}: test accuracy {acc:.4f} (spent {p['epsilon']:.4g}, sigma "
              f"{p['noiseMultiplier']:.3g}, {time.perf_counter() - t:.1f}s); diffprivlib "
              f"{'-' if other is None else f'{other:.4f}'}", flush=True)
    train.unpersist()

    try:
        from sklearn.datasets import load_breast_cancer
    except ImportError:
        print("breast cancer: scikit-learn is not installed (pip install 'sparkgd[bench]')")
    else:
        Xb, yb = load_breast_cancer(return_X_y=True)
        ours, theirs, plain_acc = [], [], []
        for run_no in range(args.dp_runs):
            rng = np.random.default_rng(100 + run_no)
            order = rng.permutation(len(yb))
            cut = int(0.7 * len(yb))
            tr, te = order[:cut], order[cut:]
            mu, sd = Xb[tr].mean(axis=0), Xb[tr].std(axis=0)
            Xtr, Xte = (Xb[tr] - mu) / sd, (Xb[te] - mu) / sd
            ytr, yte = yb[tr].astype(float), yb[te].astype(float)
            df = _frame(spark, os.path.join(args.tmp, f"bc{run_no}"), Xtr, ytr)
            m = LogisticRegression(dpEpsilon=1.0, optimizer=args.bc_optimizer,
                                   stepSize=args.bc_step, maxIter=args.bc_steps,
                                   miniBatchFraction=args.bc_q, maxGradNorm=args.bc_clip,
                                   dpDelta=1e-5, regParam=args.bc_reg).fit(df)
            ours.append(_accuracy(m, Xte, yte))
            if run_no == 0:
                plain_acc.append(_accuracy(LogisticRegression(regParam=1e-3).fit(df), Xte, yte))
            norm = float(np.linalg.norm(Xtr, axis=1).max())
            other = _diffprivlib(1.0, 1e-5, Xtr, ytr, Xte, yte, norm, run_no)
            if other is not None:
                theirs.append(other)
        results["breast_cancer"] = {"sparkgd": ours, "diffprivlib": theirs,
                                    "non_private": plain_acc[0]}
        print(f"breast cancer (569 rows, 70/30, standardized), epsilon 1, delta 1e-5, "
              f"{args.dp_runs} runs: sparkgd DP-SGD mean {statistics.mean(ours):.4f} "
              f"(min {min(ours):.4f}); diffprivlib "
              f"{'-' if not theirs else f'{statistics.mean(theirs):.4f}'}; non-private "
              f"{plain_acc[0]:.4f}", flush=True)

    print()
    print(f"DP-SGD ({args.dp_optimizer}, stepSize {args.dp_step}, {args.dp_steps} steps, "
          f"sampling rate {args.dp_q}, clip {args.dp_clip}, delta {args.dp_delta}) on "
          f"{rows} x {d}:")
    head = f"{'epsilon':>8} {'accuracy':>9} {'- non-private':>13} {'spent':>7} {'sigma':>7} " \
           f"{'diffprivlib':>11}"
    print(head)
    print("-" * len(head))
    for r in results["generated"]:
        if r["epsilon"] is None:
            continue
        dl = "-" if r["diffprivlib"] is None else f"{r['diffprivlib']:.4f}"
        print(f"{r['epsilon']:>8g} {r['accuracy']:>9.4f} {r['accuracy'] - base:>+13.4f} "
              f"{r['spent']:>7.4g} {r['sigma']:>7.3g} {dl:>11}")
    print(f"{'none':>8} {base:>9.4f}")
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results
