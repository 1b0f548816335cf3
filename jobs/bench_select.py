"""``jobs/benchmark.py --select``: model selection, sparkgd's against Spark ML's.

    ./spark-submit.sh --master 'local[2]' --driver-memory 4g jobs/benchmark.py --select

Generated binary logistic data (``--select-rows`` x ``--select-features``, default
200,000 x 50), one cached DataFrame (features as a vector), and pyspark.ml.tuning's own
``CrossValidator`` (``--select-folds`` folds, default 3) and ``TrainValidationSplit``
over the same grid -- regParam x elasticNetParam, 4 x 2 = 8 param maps -- with the same
``BinaryClassificationEvaluator`` (area under ROC), for Spark ML's LogisticRegression and
sparkgd's, every other param the same (standardization on, Spark ML's default; maxIter
100, tol 1e-6). Each library's CrossValidator runs ``--select-runs`` times, alternating,
in this one application (the first of each is the cold one); prints the times, their
ratio, the part spent in the evaluator (each model's ``transform`` and its metric: the
selection's own scoring, the same for both libraries' models) against the rest (the fits,
the folds), each grid's metrics side by side and the best map's AUC.
"""
import os
import time

import numpy as np

GRID_REG = (1e-4, 1e-3, 1e-2, 1e-1)
GRID_EN = (0.0, 0.5)


def _grid(est):
    from pyspark.ml.tuning import ParamGridBuilder

    return (ParamGridBuilder().addGrid(est.regParam, list(GRID_REG))
            .addGrid(est.elasticNetParam, list(GRID_EN)).build())


def _estimators():
    from pyspark.ml.classification import LogisticRegression as MLLogisticRegression

    import sparkgd

    common = dict(maxIter=100, tol=1e-6, standardization=True)
    return {"sparkgd": sparkgd.LogisticRegression(**common),
            "Spark ML": MLLogisticRegression(**common)}


def _select(kind, est, df, folds, parallelism, seed=0):
    from pyspark.ml.evaluation import BinaryClassificationEvaluator
    from pyspark.ml.tuning import CrossValidator, TrainValidationSplit

    ev = BinaryClassificationEvaluator(metricName="areaUnderROC")
    spent = [0.0]
    plain = ev.evaluate

    def evaluate(dataset, params=None):      # the selection's scoring: transform + metric
        t = time.perf_counter()
        try:
            return plain(dataset, params)
        finally:
            spent[0] += time.perf_counter() - t

    ev.evaluate = evaluate
    if kind == "cv":
        sel = CrossValidator(estimator=est, estimatorParamMaps=_grid(est), evaluator=ev,
                             numFolds=folds, seed=seed, parallelism=parallelism)
    else:
        sel = TrainValidationSplit(estimator=est, estimatorParamMaps=_grid(est), evaluator=ev,
                                   trainRatio=0.75, seed=seed, parallelism=parallelism)
    started = time.perf_counter()
    model = sel.fit(df)
    seconds = time.perf_counter() - started
    return seconds, spent[0], list(model.avgMetrics if kind == "cv" else model.validationMetrics)


def run(spark, args):
    from pyspark.ml.functions import array_to_vector

    from sparkgd import datagen

    rows, d = int(args.select_rows), int(args.select_features)
    path = os.path.join(args.tmp, "select")
    datagen.write_dataset(path, task="binary", rows=rows, features=d,
                          partitions=args.partitions, seed=3)
    df = spark.read.parquet(path).withColumn("features", array_to_vector("features"))
    df = df.cache()
    df.count()
    print(f"{rows} x {d} binary logistic, {args.select_folds}-fold CrossValidator and "
          f"TrainValidationSplit over {len(GRID_REG) * len(GRID_EN)} param maps "
          f"(regParam {list(GRID_REG)} x elasticNetParam {list(GRID_EN)}), "
          f"parallelism {args.select_parallelism}", flush=True)
    ests = _estimators()
    times = {(k, name): [] for k in ("cv", "tvs") for name in ests}
    scoring = {(k, name): [] for k in ("cv", "tvs") for name in ests}
    metrics = {}
    for r in range(int(args.select_runs)):
        for kind in ("cv", "tvs"):
            for name, est in ests.items():
                t, e, m = _select(kind, est, df, int(args.select_folds),
                                  int(args.select_parallelism))
                times[(kind, name)].append(t)
                scoring[(kind, name)].append(e)
                metrics[(kind, name)] = m
                print(f"  run {r + 1} {kind:>3} {name:>8}: {t:7.2f} s, of which {e:6.2f} s "
                      f"in the evaluator (transform + metric)", flush=True)
    print()
    print("| selection | sparkgd s (cold / best warm) | Spark ML s (cold / best warm) "
          "| ratio cold | ratio warm |")
    print("| --- | --- | --- | --- | --- |")
    out = {}
    for kind, label in (("cv", f"CrossValidator {args.select_folds} folds"),
                        ("tvs", "TrainValidationSplit")):
        a, b = times[(kind, "sparkgd")], times[(kind, "Spark ML")]
        warm_a = min(a[1:]) if len(a) > 1 else a[0]
        warm_b = min(b[1:]) if len(b) > 1 else b[0]
        print(f"| {label} | {a[0]:.2f} / {warm_a:.2f} | {b[0]:.2f} / {warm_b:.2f} "
              f"| {a[0] / b[0]:.3f}x | {warm_a / warm_b:.3f}x |")
        out[kind] = {"sparkgd": a, "spark_ml": b, "sparkgd_scoring": scoring[(kind, "sparkgd")],
                     "spark_ml_scoring": scoring[(kind, "Spark ML")]}
    print()
    print("| selection, best warm run | sparkgd: fits / scoring s | Spark ML: fits / scoring s "
          "| fits ratio | scoring alone / Spark ML's total |")
    print("| --- | --- | --- | --- | --- |")
    for kind in ("cv", "tvs"):
        a, b = times[(kind, "sparkgd")], times[(kind, "Spark ML")]
        ia = min(range(1, len(a)) or [0], key=lambda i: a[i])
        ib = min(range(1, len(b)) or [0], key=lambda i: b[i])
        ea, eb = scoring[(kind, "sparkgd")][ia], scoring[(kind, "Spark ML")][ib]
        print(f"| {kind} | {a[ia] - ea:.2f} / {ea:.2f} | {b[ib] - eb:.2f} / {eb:.2f} "
              f"| {(a[ia] - ea) / (b[ib] - eb):.3f}x | {ea / b[ib]:.3f}x |")
    print()
    print("| map (regParam, elasticNetParam) | " + " | ".join(
        f"{k} sparkgd | {k} Spark ML" for k in ("cv", "tvs")) + " |")
    print("| --- |" + " --- |" * 4)
    grid = [(r, e) for r in GRID_REG for e in GRID_EN]
    for i, (r, e) in enumerate(grid):
        print(f"| {r:g}, {e:g} | " + " | ".join(
            f"{metrics[(k, 'sparkgd')][i]:.6f} | {metrics[(k, 'Spark ML')][i]:.6f}"
            for k in ("cv", "tvs")) + " |")
    for kind in ("cv", "tvs"):
        a, b = np.asarray(metrics[(kind, "sparkgd")]), np.asarray(metrics[(kind, "Spark ML")])
        print(f"{kind}: best AUC sparkgd {a.max():.6f} (map {int(a.argmax())}), Spark ML "
              f"{b.max():.6f} (map {int(b.argmax())}), difference {abs(a.max() - b.max()):.2e}")
        out[kind]["best_auc"] = {"sparkgd": float(a.max()), "spark_ml": float(b.max())}
    df.unpersist()
    return out
