"""fitMultiple: param maps fitted together over one build of the blocks, their passes
shared (sparkgd/multi.py), each model the one its own fit gives; and pyspark.ml.tuning's
CrossValidator / TrainValidationSplit giving the metrics and sub-models they give with
the maps fitted one by one."""
import numpy as np
import pytest
import scipy.sparse as sp

import sparkgd
from conftest import logistic_data, regression_data, to_df
from sparkgd import coordinator, kernels, multi


# ------------------------------------------------------------------ the kernel (no Spark)


def _numpy_pass(X, y, w, coef, b, name):
    """One model's ``[loss_sum, W, grad_coef..., grad_intercept]`` from the textbook
    formulas, written here."""
    w = np.ones(len(y)) if w is None else w
    z = X @ coef + b
    if name == "logistic":
        value = np.logaddexp(0, z) - y * z
        dz = 1 / (1 + np.exp(-z)) - y
    elif name == "squared":
        value, dz = 0.5 * (z - y) ** 2, z - y
    else:                                        # hinge, y in {0, 1}
        s = 2 * y - 1
        value = np.maximum(0, 1 - s * z)
        dz = np.where(s * z < 1, -s, 0.0)
    return np.concatenate([[value @ w, w.sum()], X.T @ (w * dz), [(w * dz).sum()]])


@pytest.mark.parametrize("name", ["logistic", "squared", "hinge"])
@pytest.mark.parametrize("storage", ["float64", "csr"])
def test_models_sums_are_each_models_own_pass(name, storage):
    rng = np.random.default_rng(5)
    X = rng.normal(size=(3000, 12))
    X[np.abs(X) < 0.8] = 0.0
    y = (rng.random(3000) < 0.4).astype(float)
    w = rng.uniform(0.5, 2, size=3000)
    k = 4
    coef, b = rng.normal(size=(k, 12)) * 0.3, rng.normal(size=k)
    layout = kernels.Layout(12, k, True)
    stored = sp.csr_matrix(X) if storage == "csr" else X
    # two blocks, the first large enough to be cut in row chunks
    blocks = [(stored[:2500], y[:2500], w[:2500]), (stored[2500:], y[2500:], w[2500:])]
    total = kernels.models_sums(blocks, layout.join(coef, b), kernels.make_loss(name), layout)
    parts = kernels.split_models(total, 12, k, True)
    assert len(parts) == k
    for j in range(k):
        want = _numpy_pass(X, y, w, coef[j], b[j], name)
        np.testing.assert_allclose(parts[j], want, rtol=1e-10, atol=1e-8)


# ------------------------------------------------------------------ grouping (no Spark)


def _plan(**kw):
    base = dict(model="logistic", spec=("features", "label"), reg_param=0.0)
    base.update(kw)
    return coordinator.Plan(**base)


def test_maps_that_read_the_data_alike_are_fitted_together():
    plans = [_plan(reg_param=0.1), _plan(dtype="float32"), _plan(reg_param=0.01,
             elastic_net_param=0.5, standardization=True, max_iter=7),
             _plan(optimizer="sgd", step_size=0.1), _plan(reg_param=1.0, optimizer="gd"),
             _plan(dtype="float32", tol=1e-9), _plan(mode="local"), _plan(checkpoint_dir="/x")]
    assert multi.groups(plans) == [[0, 2, 4], [1, 5], [3], [6], [7]]
    assert not multi.shareable(_plan(mini_batch_fraction=0.5))
    assert not multi.shareable(_plan(compression="fp16"))
    assert not multi.shareable(_plan(initial=(np.zeros((1, 2)), np.zeros(1))))


class _Engine:
    """A pass over in-memory blocks, as the engine gives it; ``fail_at``: the pass
    number that raises instead."""

    def __init__(self, blocks, fail_at=None):
        self.blocks, self.fail_at, self.passes = blocks, fail_at, 0

    def evaluate(self, theta, loss, layout, sample=None, codec=None, theta_codec=None,
                 work=None):
        self.passes += 1
        if self.passes == self.fail_at:
            raise RuntimeError("a task was lost")
        if work == {"mode": "models"}:
            return kernels.models_sums(self.blocks, theta, loss, layout)
        return kernels.partition_sums(self.blocks, theta, loss, layout)


def _run_shared(engine, starts, steps):
    """``multi.train_many`` over ``engine`` with toy fits: fit i takes ``steps[i]``
    gradient steps from ``starts[i]`` (one pass each) -> (outcomes or the error, passes)."""
    loss, layout = kernels.make_loss("logistic"), kernels.Layout(4, 1, True)

    def train(plan, view, _attempts):
        theta = plan[0].copy()
        for _ in range(plan[1]):
            total = view.evaluate(theta, loss, layout)
            theta -= 0.5 * total[2:] / total[1]
        return theta

    box = {}

    def run():
        try:
            box["out"] = multi.train_many(list(zip(starts, steps)), engine,
                                          [None] * len(starts), train)
        except Exception as e:     # noqa: BLE001 - the test looks at it
            box["out"] = e

    import threading

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive(), "the shared passes deadlocked"
    return box["out"], train, loss, layout


def test_shared_passes_give_each_fit_its_own_steps_and_fail_every_fit_together():
    rng = np.random.default_rng(9)
    X = rng.normal(size=(500, 4))
    y = (rng.random(500) < 0.5).astype(float)
    blocks = [(X, y, None)]
    starts = [rng.normal(size=5) * 0.1 for _ in range(3)]
    steps = [4, 1, 6]                  # fits that end early leave the passes
    engine = _Engine(blocks)
    got, train, loss, layout = _run_shared(engine, starts, steps)
    assert engine.passes == max(steps)            # one pass for every live fit at once
    for theta, start, k in zip(got, starts, steps):
        alone = _Engine(blocks)
        want = train((start, k), alone, None)     # the same fit, its passes its own
        np.testing.assert_allclose(theta, want, rtol=1e-12)
    # a pass that fails fails the fits in it; the others go on; the error comes out
    got, *_ = _run_shared(_Engine(blocks, fail_at=2), starts, steps)
    assert isinstance(got, RuntimeError) and "a task was lost" in str(got)


# ------------------------------------------------------------------ fitMultiple (Spark)


@pytest.fixture(scope="module")
def frames(spark):
    Xb, yb, wb = logistic_data(n=3000, d=6, seed=21, weights=True)
    Xr, yr, wr = regression_data(n=3000, d=6, seed=22, weights=True)
    return {"logistic": to_df(spark, Xb, yb, wb, kind="vector").cache(),
            "linear": to_df(spark, Xr, yr, wr, kind="vector").cache()}


GRIDS = {
    "logistic": (lambda: sparkgd.LogisticRegression(weightCol="weight", tol=1e-10, maxIter=300),
                 [{"regParam": 0.0}, {"regParam": 0.01, "elasticNetParam": 0.5},
                  {"regParam": 0.1}, {"regParam": 0.01, "standardization": True},
                  {"regParam": 0.05, "optimizer": "sgd", "stepSize": 0.5, "maxIter": 20}]),
    "linear": (lambda: sparkgd.LinearRegression(weightCol="weight", tol=1e-10, maxIter=300),
               [{"regParam": 0.0}, {"regParam": 0.3, "elasticNetParam": 1.0},
                {"regParam": 0.1, "maxIter": 3}]),
}


@pytest.mark.parametrize("kind", ["logistic", "linear"])
def test_fit_multiple_gives_each_maps_own_model(spark, frames, kind):
    make, maps = GRIDS[kind]
    est = make()
    param_maps = [{getattr(est, k): v for k, v in m.items()} for m in maps]
    got = dict(est.fitMultiple(frames[kind], param_maps))
    assert sorted(got) == list(range(len(maps)))
    shared = [i for i, m in enumerate(maps) if m.get("optimizer") != "sgd"]
    lone = [est.fit(frames[kind], pm) for pm in param_maps]
    for i, pm in enumerate(param_maps):
        alone = lone[i]
        model = got[i]
        for p, v in pm.items():                  # each model carries its own map's params
            assert model.getOrDefault(model.getParam(p.name)) == v
        s, a = model.summary, alone.summary
        assert s.totalIterations == pytest.approx(a.totalIterations, abs=1)
        assert s.objectiveHistory[-1] == pytest.approx(a.objectiveHistory[-1], abs=1e-10)
        np.testing.assert_allclose(np.asarray(model.coefficients), np.asarray(alone.coefficients),
                                   atol=1e-6)
        assert model.intercept == pytest.approx(alone.intercept, abs=1e-6)
        if i in shared:
            assert s.engine.endswith(f"passes shared by {len(shared)} fits"), s.engine
        else:
            assert "shared" not in s.engine
    # the unpenalized map keeps its coefficient statistics; the training metrics are
    # computed from the DataFrame when asked, and equal the lone fit's
    np.testing.assert_allclose(got[0].summary.coefficientStandardErrors,
                               lone[0].summary.coefficientStandardErrors, rtol=1e-6)
    metric = "rootMeanSquaredError" if kind == "linear" else "accuracy"
    assert getattr(got[2].summary, metric) == pytest.approx(getattr(lone[2].summary, metric),
                                                            rel=1e-9)


@pytest.mark.parametrize("selector", ["cv", "tvs"])
def test_tuning_gives_the_metrics_of_maps_fitted_one_by_one(spark, frames, selector,
                                                           monkeypatch):
    from pyspark.ml import Estimator
    from pyspark.ml.evaluation import BinaryClassificationEvaluator
    from pyspark.ml.tuning import CrossValidator, TrainValidationSplit

    lr = sparkgd.LogisticRegression(weightCol="weight", tol=1e-10, maxIter=300)
    grid = [{lr.regParam: 0.001}, {lr.regParam: 0.05},
            {lr.regParam: 0.01, lr.elasticNetParam: 0.5}]
    ev = BinaryClassificationEvaluator(weightCol="weight")
    if selector == "cv":
        make = lambda: CrossValidator(estimator=lr, estimatorParamMaps=grid, evaluator=ev,
                                      numFolds=2, parallelism=2, seed=3, collectSubModels=True)
    else:
        make = lambda: TrainValidationSplit(estimator=lr, estimatorParamMaps=grid, evaluator=ev,
                                            parallelism=2, seed=3, collectSubModels=True)
    shared = make().fit(frames["logistic"])
    monkeypatch.setattr(sparkgd.LogisticRegression, "fitMultiple", Estimator.fitMultiple)
    one_by_one = make().fit(frames["logistic"])
    metrics = "avgMetrics" if selector == "cv" else "validationMetrics"
    np.testing.assert_allclose(getattr(shared, metrics), getattr(one_by_one, metrics),
                               atol=1e-9)
    subs = shared.subModels if selector == "tvs" else [m for fold in shared.subModels
                                                       for m in fold]
    alone = one_by_one.subModels if selector == "tvs" else [m for fold in one_by_one.subModels
                                                            for m in fold]
    assert len(subs) == len(alone) == (6 if selector == "cv" else 3)
    for a, b in zip(subs, alone):
        assert "shared by 3 fits" in a.summary.engine and "shared" not in b.summary.engine
        np.testing.assert_allclose(a.coefficients, b.coefficients,
                                   atol=1e-6)
    np.testing.assert_allclose(shared.bestModel.coefficients,
                               one_by_one.bestModel.coefficients, atol=1e-6)
