"""Every loss, elastic net, every optimizer, standardization, warm start, sparse input.

References are independent: SciPy / NumPy solves of the DESIGN.md objective, and
``pyspark.ml`` on the same data.
"""
import numpy as np
import pytest
import scipy.sparse as sp

import sparkgd
from sparkgd import kernels, optim
from sparkgd.errors import SparkgdError

from conftest import logistic_data, regression_data, to_df
from references import full_objective, model_theta, np_smooth, reference_optimum


def multiclass_data(n=400, d=4, k=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    B = rng.normal(size=(k, d))
    Z = X @ B.T
    P = np.exp(Z - Z.max(axis=1, keepdims=True))
    P /= P.sum(axis=1, keepdims=True)
    y = np.array([rng.choice(k, p=p) for p in P], dtype=float)
    return X, y


# --------------------------------------------------------------------------- the optima


CASES = {
    "huber": dict(cls="LinearRegression", loss="huber", reg=0.01, alpha=0.0),
    "multinomial": dict(cls="LogisticRegression", loss="multinomial", reg=0.01, alpha=0.0),
    "enet-logistic": dict(cls="LogisticRegression", loss="logistic", reg=0.05, alpha=0.5),
    "enet-squared": dict(cls="LinearRegression", loss="squared", reg=0.1, alpha=0.5),
    "weighted-enet-logistic": dict(cls="LogisticRegression", loss="logistic", reg=0.02,
                                   alpha=0.8, weights=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_lbfgs_reaches_the_reference_optimum(spark, case):
    c = CASES[case]
    w = None
    if c["loss"] == "multinomial":
        X, y = multiclass_data(seed=1)
        k = 3
    else:
        data = logistic_data if c["loss"] == "logistic" else regression_data
        X, y, w = data(n=400, d=5, seed=2, weights=c.get("weights", False))
        X = X * [1, 10, 0.1, 3, 1] + [0, 5, 0, 0, -2]  # units differ, as in real data
        k = 1
    df = to_df(spark, X, y, w, partitions=3)
    est = getattr(sparkgd, c["cls"])(regParam=c["reg"], elasticNetParam=c["alpha"], tol=1e-9,
                                     weightCol="weight" if w is not None else None)
    if c["loss"] == "huber":
        est.setParams(loss="huber")
    model = est.fit(df)
    _, f_ref = reference_optimum(X, y, w, c["loss"], k, c["reg"], c["alpha"])
    f = model.summary.objectiveHistory[-1]
    assert (f - f_ref) / abs(f_ref) <= 1e-6, (f, f_ref)
    # the reported objective is F at the returned coefficients
    f_check = full_objective(model_theta(model), X, y, w, c["loss"], k, c["reg"], c["alpha"])
    assert abs(f_check - f) <= 1e-9 * abs(f)


def test_float32_storage_reaches_the_float64_optimum_to_1e_6(spark):
    """dtype=float32 holds the features as float32 and multiplies them in float32 (sums
    in float64): its model's objective, computed in float64 on the original features,
    is within 1e-6 of the float64 optimum (the rounded data's optimum and the float32
    products each move it by ~1e-8 here)."""
    X, y, _ = logistic_data(n=400, d=5, seed=9)
    X = X * [1, 10, 0.1, 3, 1] + [0.3, 5, 0, 0, -2]
    df = to_df(spark, X, y, partitions=3)
    model = sparkgd.LogisticRegression(regParam=0.01, tol=1e-12, dtype="float32").fit(df)
    _, f_ref = reference_optimum(X, y, None, "logistic", 1, 0.01, 0.0)
    f = full_objective(model_theta(model), X, y, None, "logistic", 1, 0.01, 0.0)
    assert f - f_ref <= 1e-6 * abs(f_ref), (f, f_ref)
    X32 = X.astype(np.float32).astype(np.float64)
    f32 = full_objective(model_theta(model), X32, y, None, "logistic", 1, 0.01, 0.0)
    assert model.summary.objectiveHistory[-1] == pytest.approx(f32, rel=1e-6)
    assert model.getDtype() == "float32"
    with pytest.raises(SparkgdError, match="unknown dtype 'float16'"):
        sparkgd.LogisticRegression(dtype="float16").fit(df)


def test_l1_zeros_are_exact_and_match_the_reference(spark):
    X, y, _ = regression_data(n=300, d=8, seed=3)
    y = X[:, :3] @ np.array([1.0, -2.0, 0.5]) + 0.2 * np.random.default_rng(0).normal(size=300)
    df = to_df(spark, X, y, partitions=2)
    theta_ref, f_ref = reference_optimum(X, y, None, "squared", 1, 0.2, 1.0)
    zeros = np.abs(theta_ref[:8]) < 1e-9
    assert 2 <= zeros.sum() <= 6
    for optimizer in ("lbfgs", "gd"):
        m = sparkgd.LinearRegression(regParam=0.2, elasticNetParam=1.0, optimizer=optimizer,
                                     tol=1e-12, maxIter=500).fit(df)
        np.testing.assert_array_equal(m.coefficients == 0.0, zeros, err_msg=optimizer)
        assert (m.summary.objectiveHistory[-1] - f_ref) / f_ref <= 1e-8


def test_gd_with_l1_reaches_the_optimum(spark):
    X, y, _ = logistic_data(n=300, d=5, seed=4)
    df = to_df(spark, X, y, partitions=2)
    _, f_ref = reference_optimum(X, y, None, "logistic", 1, 0.05, 1.0)
    m = sparkgd.LogisticRegression(regParam=0.05, elasticNetParam=1.0, optimizer="gd",
                                   tol=1e-10, maxIter=2000).fit(df)
    assert (m.summary.objectiveHistory[-1] - f_ref) / f_ref <= 1e-5


# ------------------------------------------------------ distributed == single process


@pytest.mark.parametrize("name", ["momentum", "nesterov", "adam", "sgd"])
def test_first_order_iterations_equal_the_numpy_run(spark, name):
    """A few distributed iterations equal the same optimizer on a NumPy objective."""
    X, y, _ = logistic_data(n=200, d=3, seed=5)
    df = to_df(spark, X, y, partitions=3)
    reg, alpha, step = 0.05, 0.5, 0.2
    m = sparkgd.LogisticRegression(optimizer=name, stepSize=step, maxIter=6, tol=0,
                                   regParam=reg, elasticNetParam=alpha).fit(df)
    l1 = np.r_[reg * alpha * np.ones(3), 0.0]
    x0 = np.r_[0.0, 0.0, 0.0, np.log(y.sum() / (1 - y).sum())]  # Spark ML's start: log-odds
    ref = optim.minimize(name, lambda t: np_smooth(t, X, y, None, "logistic", l2=reg * (1 - alpha)),
                         x0, max_iter=6, tol=0, step_size=step, l1=l1)
    # At the log-odds start the intercept's gradient is 0 up to rounding (1e-17), and
    # adam divides by its magnitude: its first intercept step carries that rounding.
    atol = 1e-9 if name == "adam" else 1e-13
    np.testing.assert_allclose(model_theta(m), ref.x, rtol=1e-10, atol=atol)
    np.testing.assert_allclose(m.summary.objectiveHistory, ref.history, rtol=1e-10)


def test_sgd_mini_batches_are_reproducible_and_end_on_the_full_objective(spark):
    X, y, _ = logistic_data(n=400, d=3, seed=6)
    df = to_df(spark, X, y, partitions=2)

    def fit(seed):
        return sparkgd.LogisticRegression(optimizer="sgd", miniBatchFraction=0.5, stepSize=1.0,
                                          maxIter=8, tol=0, seed=seed).fit(df)

    a, b, c = fit(1), fit(1), fit(2)
    np.testing.assert_array_equal(model_theta(a), model_theta(b))
    assert a.summary.objectiveHistory == b.summary.objectiveHistory
    assert not np.array_equal(model_theta(a), model_theta(c))
    f_full = full_objective(model_theta(a), X, y, None, "logistic", 1, 0.0, 0.0)
    assert abs(a.summary.objectiveHistory[-1] - f_full) <= 1e-12 * f_full
    assert len(a.summary.objectiveHistory) == a.summary.totalIterations == 8


# ---------------------------------------------------------------------- against pyspark.ml


def spark_ml_theta(model, k=1):
    if k > 1:
        return np.r_[model.coefficientMatrix.toArray().ravel(), model.interceptVector.toArray()]
    return np.r_[model.coefficients.toArray(), model.intercept]


@pytest.mark.parametrize("standardization", [False, True])
def test_logistic_matches_spark_ml(spark, standardization):
    from pyspark.ml.classification import LogisticRegression as SparkLR
    from pyspark.ml.functions import array_to_vector

    X, y, _ = logistic_data(n=400, d=4, seed=7)
    X = X * [1, 5, 0.2, 1]
    df = to_df(spark, X, y, partitions=2).cache()
    vec = df.withColumn("features", array_to_vector("features"))
    params = dict(regParam=0.03, elasticNetParam=0.4, standardization=standardization)
    ours = sparkgd.LogisticRegression(tol=1e-12, maxIter=500, **params).fit(df)
    ref = SparkLR(tol=1e-12, maxIter=1000, **params).fit(vec)
    np.testing.assert_allclose(model_theta(ours), spark_ml_theta(ref), rtol=2e-4, atol=2e-5)
    df.unpersist()


def test_multinomial_matches_spark_ml(spark):
    from pyspark.ml.classification import LogisticRegression as SparkLR
    from pyspark.ml.functions import array_to_vector

    X, y = multiclass_data(n=400, d=3, seed=8)
    df = to_df(spark, X, y, partitions=2)
    ours = sparkgd.LogisticRegression(regParam=0.02, tol=1e-12, maxIter=500).fit(df)
    assert ours.numClasses == 3 and ours.coefficients.shape == (3, 3)
    ref = SparkLR(regParam=0.02, standardization=False, tol=1e-12, maxIter=1000,
                  family="multinomial").fit(df.withColumn("features", array_to_vector("features")))
    np.testing.assert_allclose(model_theta(ours), spark_ml_theta(ref, 3), rtol=2e-4, atol=2e-5)
    rows = ours.transform(df).select("features", "probability", "prediction").collect()
    P = np.array([r.probability.toArray() for r in rows])
    Xr = np.array([r.features for r in rows])
    np.testing.assert_allclose(P, ours.predictProbability(Xr), rtol=1e-10)
    np.testing.assert_allclose(P.sum(axis=1), 1.0, rtol=1e-12)
    assert [r.prediction for r in rows] == P.argmax(axis=1).astype(float).tolist()


@pytest.mark.parametrize("standardization,alpha", [(False, 0.0), (True, 0.0), (False, 0.5),
                                                   (True, 0.5)])
def test_squared_matches_spark_ml(spark, standardization, alpha):
    """Spark ML's LinearRegression fits y / std(y) with regParam / std(y): in this
    objective's terms its L2 strength is regParam / std(y), its L1 strength regParam."""
    from pyspark.ml.functions import array_to_vector
    from pyspark.ml.regression import LinearRegression as SparkLinR

    X, y, _ = regression_data(n=300, d=4, seed=9)
    X = X * [1, 4, 0.5, 2]
    df = to_df(spark, X, y, partitions=2)
    lam, sy = 0.1, y.std(ddof=1)
    l2, l1 = lam * (1 - alpha) / sy, lam * alpha
    ours = sparkgd.LinearRegression(regParam=l1 + l2, elasticNetParam=l1 / (l1 + l2),
                                    standardization=standardization, tol=1e-12).fit(df)
    ref = SparkLinR(regParam=lam, elasticNetParam=alpha, standardization=standardization,
                    solver="l-bfgs", tol=1e-12, maxIter=1000).fit(
        df.withColumn("features", array_to_vector("features")))
    np.testing.assert_allclose(model_theta(ours), spark_ml_theta(ref), rtol=1e-5, atol=1e-7)


def test_linear_svc_is_at_least_as_good_as_spark_ml(spark):
    """Hinge is not smooth: compare the objective both reach, not the coefficients."""
    from pyspark.ml.classification import LinearSVC as SparkSVC
    from pyspark.ml.functions import array_to_vector

    X, y, _ = logistic_data(n=300, d=3, seed=10)
    df = to_df(spark, X, y, partitions=2)
    ours = sparkgd.LinearSVC(regParam=0.01, tol=1e-9, maxIter=100).fit(df)
    ref = SparkSVC(regParam=0.01, standardization=False, tol=1e-6, maxIter=25).fit(
        df.withColumn("features", array_to_vector("features")))
    f_ours = full_objective(model_theta(ours), X, y, None, "hinge", 1, 0.01, 0.0)
    f_ref = full_objective(spark_ml_theta(ref), X, y, None, "hinge", 1, 0.01, 0.0)
    assert f_ours <= f_ref * (1 + 1e-4), (f_ours, f_ref)
    assert abs(ours.summary.objectiveHistory[-1] - f_ours) <= 1e-9 * f_ours
    rows = ours.transform(df).select("rawPrediction", "prediction").collect()
    assert all(r.prediction == float(r.rawPrediction[1] > 0) for r in rows)


# ------------------------------------------------------------------ warm start, sparse


def test_warm_start_continues_and_checks_dimensions(spark, tmp_path):
    X, y, _ = logistic_data(n=200, d=3, seed=11)
    df = to_df(spark, X, y, partitions=2)
    first = sparkgd.LogisticRegression(optimizer="gd", stepSize=0.5, maxIter=5, tol=0).fit(df)
    both = sparkgd.LogisticRegression(optimizer="gd", stepSize=0.5, maxIter=10, tol=0).fit(df)
    second = sparkgd.LogisticRegression(optimizer="gd", stepSize=0.5, maxIter=5, tol=0,
                                        initialModel=first).fit(df)
    np.testing.assert_allclose(model_theta(second), model_theta(both), rtol=1e-12)
    first.save(str(tmp_path / "m"))
    from_path = sparkgd.LogisticRegression(optimizer="gd", stepSize=0.5, maxIter=5, tol=0,
                                           initialModel=str(tmp_path / "m")).fit(df)
    np.testing.assert_array_equal(model_theta(from_path), model_theta(second))
    X4, y4, _ = logistic_data(n=50, d=4, seed=1)
    with pytest.raises(SparkgdError, match="initialModel has 3 features but the data has 4"):
        sparkgd.LogisticRegression(initialModel=first).fit(to_df(spark, X4, y4))


def sparse_df(spark, X, y, partitions=2):
    from pyspark.ml.linalg import SparseVector

    rows = []
    for i in range(X.shape[0]):
        nz = np.flatnonzero(X[i])
        rows.append((SparseVector(X.shape[1], nz.tolist(), X[i, nz].tolist()), float(y[i])))
    return spark.createDataFrame(rows, ["features", "label"]).repartition(partitions)


def test_sparse_vectors_become_csr_and_agree_with_dense(spark):
    from sparkgd.data import resolve_input
    from sparkgd.engine import Engine
    from sparkgd.modes.sync import DistributedObjective
    from sparkgd.penalties import Penalty

    rng = np.random.default_rng(12)
    n, d = 300, 200
    X = rng.normal(size=(n, d)) * (rng.random((n, d)) < 0.03)
    y = (rng.random(n) < 0.5).astype(float)
    sdf, ddf = sparse_df(spark, X, y), to_df(spark, X, y, partitions=2)
    layout = kernels.Layout(d, 1, True)
    theta = rng.normal(size=layout.size) * 0.1
    values = []
    for df in (sdf, ddf):
        with Engine.open(df, resolve_input(df.schema), store="files") as engine:
            kinds = engine._store.rdd.map(lambda b: sp.issparse(b[0])).collect()
            values.append((kinds, DistributedObjective(engine, kernels.make_loss("logistic"),
                                                        layout, Penalty(layout, 0.1))(theta)))
    (sk, (fs, gs)), (dk, (fd, gd)) = values
    assert all(sk) and not any(dk)
    assert abs(fs - fd) <= 1e-12 * abs(fd)
    np.testing.assert_allclose(gs, gd, rtol=1e-12, atol=1e-15)
    a = sparkgd.LogisticRegression(regParam=0.1, tol=1e-10, standardization=True).fit(sdf)
    b = sparkgd.LogisticRegression(regParam=0.1, tol=1e-10, standardization=True).fit(ddf)
    np.testing.assert_allclose(model_theta(a), model_theta(b), rtol=1e-6, atol=1e-9)
    preds = a.transform(sdf).select("prediction").collect()
    assert len(preds) == n
