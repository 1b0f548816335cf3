"""The distributed objective equals a single-process NumPy computation of the same formula."""
import numpy as np
import pytest
from scipy.optimize import minimize as scipy_minimize

from sparkgd import kernels
from sparkgd.comm import tree_levels
from sparkgd.data import resolve_input
from sparkgd.engine import Engine, collective
from sparkgd.modes.sync import DistributedObjective
from sparkgd.penalties import Penalty

from conftest import logistic_data, regression_data, to_df


def numpy_objective(theta, X, y, w, loss_name, fit_intercept, reg):
    """F and grad straight from DESIGN.md section 1, written independently of sparkgd."""
    d = X.shape[1]
    beta = theta[:d]
    b = theta[d] if fit_intercept else 0.0
    z = X @ beta + b
    w = np.ones_like(y) if w is None else w
    W = w.sum()
    if loss_name == "logistic":
        lz = np.logaddexp(0, z) - y * z
        dz = 1 / (1 + np.exp(-z)) - y
    else:
        lz = 0.5 * (y - z) ** 2
        dz = z - y
    f = (w @ lz) / W + 0.5 * reg * beta @ beta
    g = np.concatenate([X.T @ (w * dz) / W + reg * beta, [w @ dz / W] if fit_intercept else []])
    return f, g


@pytest.fixture(scope="module")
def weighted_logistic(spark):
    X, y, w = logistic_data(n=500, d=6, seed=11, weights=True)
    return X, y, w, to_df(spark, X, y, w, partitions=5)


@pytest.mark.parametrize("partitions", [1, 3, 8])
@pytest.mark.parametrize("depth", [2, 3])
def test_loss_and_gradient_match_numpy(spark, weighted_logistic, partitions, depth):
    X, y, w, df = weighted_logistic
    spec = resolve_input(df.schema, weight_col="weight")
    loss = kernels.make_loss("logistic")
    layout = kernels.Layout(X.shape[1], 1, True)
    rng = np.random.default_rng(partitions * 10 + depth)
    with Engine.open(df, spec, store="files", num_partitions=partitions,
                     aggregation_depth=depth) as engine:
        assert engine.facts.num_partitions == partitions and engine.facts.num_rows == len(y)
        obj = DistributedObjective(engine, loss, layout, Penalty(layout, 0.1))
        for _ in range(2):
            theta = rng.normal(size=layout.size)
            f, g = obj(theta)
            f_ref, g_ref = numpy_objective(theta, X, y, w, "logistic", True, 0.1)
            assert abs(f - f_ref) <= 1e-12 * abs(f_ref)
            np.testing.assert_allclose(g, g_ref, rtol=1e-12, atol=1e-14 * np.abs(g_ref).max())
        # serving tasks (here one: local mode has one executor): theta to the tree's
        # root and down it, the sums up it (collective.pass_bytes, also checked there)
        assert engine.kind == "workers"
        per_eval = sum(collective.pass_bytes("tree", engine.num_tasks, layout.size,
                                             depth=depth).values())
        assert engine.bytes_communicated == 2 * per_eval


def test_squared_loss_without_intercept_matches_numpy(spark):
    X, y, _ = regression_data(n=300, d=4, seed=5)
    df = to_df(spark, X, y, partitions=3)
    layout = kernels.Layout(4, 1, False)
    with Engine.open(df, resolve_input(df.schema)) as engine:
        obj = DistributedObjective(engine, kernels.make_loss("squared"), layout, Penalty(layout))
        theta = np.array([0.5, -1.0, 2.0, 0.1])
        f, g = obj(theta)
    f_ref, g_ref = numpy_objective(theta, X, y, None, "squared", False, 0.0)
    assert abs(f - f_ref) <= 1e-12 * abs(f_ref)
    np.testing.assert_allclose(g, g_ref, rtol=1e-12)


def test_tree_levels_follow_spark_rule():
    assert tree_levels(1, 2) == [1]
    assert tree_levels(3, 2) == [3]           # scale 2: 3 > 2 + 1.5 is false
    assert tree_levels(8, 2) == [8, 2]        # scale 3: 8 > 3 + 8/3, then 8/3 -> 2
    assert tree_levels(100, 2) == [100, 10]
    assert tree_levels(1000, 3) == [1000, 100, 10]


@pytest.mark.parametrize("loss_name,weighted", [("logistic", False), ("logistic", True),
                                                ("squared", False), ("squared", True)])
def test_lbfgs_reaches_the_scipy_optimum(spark, loss_name, weighted):
    import sparkgd

    data = logistic_data if loss_name == "logistic" else regression_data
    X, y, w = data(n=400, d=5, seed=21, weights=weighted)
    df = to_df(spark, X, y, w, partitions=3)
    reg = 0.05
    ref = scipy_minimize(numpy_objective, np.zeros(6), args=(X, y, w, loss_name, True, reg),
                         jac=True, method="L-BFGS-B",
                         options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10000})
    cls = sparkgd.LogisticRegression if loss_name == "logistic" else sparkgd.LinearRegression
    est = cls(regParam=reg, tol=1e-9, weightCol="weight" if weighted else None)
    model = est.fit(df)
    f = model.summary.objectiveHistory[-1]
    assert (f - ref.fun) / abs(ref.fun) <= 1e-6
    f_check, _ = numpy_objective(np.r_[model.coefficients, model.intercept], X, y, w,
                                 loss_name, True, reg)
    assert abs(f_check - f) <= 1e-12 * abs(f)
    np.testing.assert_allclose(np.r_[model.coefficients, model.intercept], ref.x, atol=1e-4)


def test_gd_fixed_step_reproduces_numpy_iterations(spark):
    import sparkgd

    X, y, _ = logistic_data(n=300, d=4, seed=8)
    df = to_df(spark, X, y, partitions=3)
    theta = np.r_[np.zeros(4), np.log(y.sum() / (1 - y).sum())]  # Spark ML's start: log-odds
    expected = []
    for _ in range(6):
        theta = theta - 0.7 * numpy_objective(theta, X, y, None, "logistic", True, 0.02)[1]
        expected.append(numpy_objective(theta, X, y, None, "logistic", True, 0.02)[0])
    model = sparkgd.LogisticRegression(optimizer="gd", stepSize=0.7, maxIter=6, tol=0,
                                       regParam=0.02).fit(df)
    np.testing.assert_allclose(np.r_[model.coefficients, model.intercept], theta, rtol=1e-12)
    np.testing.assert_allclose(model.summary.objectiveHistory, expected, rtol=1e-12)
    assert model.summary.totalIterations == 6


def test_gd_backtracking_reaches_the_optimum(spark):
    import sparkgd

    X, y, _ = logistic_data(n=300, d=4, seed=9)
    df = to_df(spark, X, y, partitions=2)
    ref = scipy_minimize(numpy_objective, np.zeros(5), args=(X, y, None, "logistic", True, 0.0),
                         jac=True, method="L-BFGS-B", options={"ftol": 1e-15, "gtol": 1e-12})
    model = sparkgd.LogisticRegression(optimizer="gd", maxIter=2000, tol=1e-10).fit(df)
    assert (model.summary.objectiveHistory[-1] - ref.fun) / ref.fun <= 1e-5


@pytest.mark.parametrize("optimizer,tol,bound", [("lbfgs", 1e-6, 1e-6), ("gd", 1e-10, 1e-5)])
def test_badly_scaled_features_still_reach_the_optimum(spark, optimizer, tol, bound):
    """Real data has features in different units; defaults must still get there."""
    import sparkgd

    X, y, w = logistic_data(n=500, d=4, seed=13, weights=True)
    X = X * [1.0, 300.0, 0.01, 5.0] + [0.0, 2000.0, 0.0, -3.0]
    df = to_df(spark, X, y, w, partitions=3)
    # the reference is solved in well-scaled coordinates, then mapped back
    s = np.r_[X.std(axis=0), 1.0]

    def scaled(u):
        f, g = numpy_objective(u / s, X, y, w, "logistic", True, 0.0)
        return f, g / s

    ref = scipy_minimize(scaled, np.zeros(5), jac=True, method="L-BFGS-B",
                         options={"ftol": 1e-16, "gtol": 1e-13, "maxiter": 20000})
    model = sparkgd.LogisticRegression(optimizer=optimizer, tol=tol, weightCol="weight",
                                       maxIter=2000 if optimizer == "gd" else 100).fit(df)
    f = model.summary.objectiveHistory[-1]
    assert (f - ref.fun) / ref.fun <= bound, (f, ref.fun, model.summary.totalIterations)


@pytest.mark.parametrize("store", ["files", "served"])
def test_moments_from_block_facts_equal_the_pass_and_numpy(spark, store):
    """Feature moments folded into the build equal a pass over the blocks and NumPy's."""

    rng = np.random.default_rng(12)
    X = rng.normal(size=(500, 4)) * [1.0, 10.0, 0.0, 1e4] + [0.0, 5.0, 2.0, 1.7e9]
    y = (rng.uniform(size=500) < 0.4).astype(float)
    w = rng.uniform(0.5, 2.0, 500)
    df = to_df(spark, X, y, w, partitions=3)
    key = "spark.sql.execution.arrow.maxRecordsPerBatch"
    old = spark.conf.get(key)
    spark.conf.set(key, "37")  # several batches per block: their facts are merged
    try:
        engine = Engine.open(df, resolve_input(df.schema, weight_col="weight"), store=store)
    finally:
        spark.conf.set(key, old)
    with engine:
        infos = engine.facts.infos
        assert all(i["moments"] is not None for i in infos)
        mean, std = engine.moments(4)
        assert engine.bytes_communicated == 8 * (2 + 2 * 4) * len(infos)
        if store == "files":
            for i in infos:
                i["moments"] = None  # as for wide blocks: the moments come from a pass
        pass_mean, pass_std = engine.moments(4) if store == "files" else (mean, std)
    ref_mean = w @ X / w.sum()
    ref_std = np.sqrt((w @ (X - ref_mean) ** 2) / (w.sum() - (w @ w) / w.sum()))
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-12)
    np.testing.assert_allclose(pass_mean, ref_mean, rtol=1e-12)
    np.testing.assert_allclose(std[[0, 1, 3]], ref_std[[0, 1, 3]], rtol=1e-9)
    np.testing.assert_allclose(pass_std[[0, 1, 3]], ref_std[[0, 1, 3]], rtol=1e-9)
    assert std[2] == pass_std[2] == 0.0


def test_driver_bytes_count_the_drivers_links_only(spark, weighted_logistic):
    """Served tasks in a star talk to the driver alone: driverBytes is all of
    bytesCommunicated; in the default tree of two, the rest is the link between them.
    One Spark job per pass over 8 tasks: treeAggregate sums on executors first, and only
    its last level reaches the driver."""
    import sparkgd

    X, y, w, df = weighted_logistic
    layout = kernels.Layout(X.shape[1], 1, True)
    s = sparkgd.LogisticRegression(regParam=0.1, weightCol="weight",
                                   topology="star").fit(df).summary
    assert s.driverBytes == s.bytesCommunicated > 0
    s = sparkgd.LogisticRegression(regParam=0.1, weightCol="weight").fit(df).summary
    link = collective.pass_bytes("tree", 2, layout.size)["peers"]     # local[2]: 2 tasks
    assert s.bytesCommunicated - s.driverBytes == s.numEvaluations * link > 0
    spec = resolve_input(df.schema, weight_col="weight")
    with Engine.open(df, spec, store="files", per_pass="jobs", num_partitions=8) as engine:
        engine._store.rdd = engine._store.rdd.repartition(8)   # 8 tasks per pass
        obj = DistributedObjective(engine, kernels.make_loss("logistic"), layout,
                                   Penalty(layout, 0.1))
        obj(np.zeros(layout.size))
        levels = tree_levels(8, 2)
        assert levels == [8, 2]
        out = 8 * layout.size * 8
        assert engine.bytes_communicated == out + 8 * (2 + layout.size) * sum(levels)
        assert engine.driver_bytes == out + 8 * (2 + layout.size) * levels[-1]
