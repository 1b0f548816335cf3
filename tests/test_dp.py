"""DP-SGD end to end: the engine's clipped sums against NumPy, the accountant's epsilon in
the summary, noise that no seed replays, and every refusal (one clear error each)."""
import math

import numpy as np
import pytest

import sparkgd
from sparkgd import kernels, privacy
from sparkgd.errors import SparkgdError

from conftest import logistic_data, to_df


@pytest.fixture(scope="module")
def scaled(spark):
    """Logistic data with feature rows of norm <= 1 (as DP-SGD wants them)."""
    X, y, _ = logistic_data(n=3000, d=5, seed=21)
    X = X / np.maximum(1.0, np.linalg.norm(X, axis=1))[:, None]
    return X, y, to_df(spark, X, y, partitions=3)


def test_the_engine_sums_clipped_gradients_as_numpy_does(spark, scaled):
    """One DP pass over all rows (q = 1) through the serving tasks equals
    privacy.clipped_sums on the whole matrix: per-example clipping, then the sum."""
    from sparkgd import data, engine, work

    X, y, df = scaled
    X = X.copy()
    X[7] *= 1e6                                    # one row of huge norm: clipped to C
    df = to_df(spark, X, y, partitions=3)
    spec = data.resolve_input(df.schema, "features", None, "label", None)
    loss = kernels.make_loss("logistic")
    layout = kernels.Layout(5, 1, True)
    theta = np.linspace(-0.5, 0.5, layout.size)
    with engine.Engine.open(df, spec, parse_work=work.parse) as eng:
        got = eng.evaluate(theta, loss, layout, (1.0, 123, 1), work={"mode": "dp", "clip": 0.3})
    want = privacy.clipped_sums(X, y, None, theta, loss, layout, 0.3)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # the huge row moved the gradient sum by at most C
    rest = privacy.clipped_sums(np.delete(X, 7, 0), np.delete(y, 7), None, theta, loss,
                                layout, 0.3)
    assert np.linalg.norm(got[2:] - rest[2:]) <= 0.3 + 1e-12


def _accountant_epsilon(q, sigma, steps, delta):
    """dp-accounting's own epsilon, written out here independently of sparkgd."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
                steps)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("given", ["noiseMultiplier", "dpEpsilon"])
def test_summary_epsilon_is_the_accountants(scaled, given):
    _X, _y, df = scaled
    params = {"noiseMultiplier": 1.3} if given == "noiseMultiplier" else {"dpEpsilon": 2.0}
    model = sparkgd.LogisticRegression(optimizer="sgd", stepSize=0.5, maxIter=40,
                                       miniBatchFraction=0.2, regParam=0.001,
                                       **params).fit(df)
    p = model.summary.privacy
    assert p["steps"] == 40 and p["samplingRate"] == 0.2 and p["maxGradNorm"] == 1.0
    assert p["delta"] == 3e-5                     # 1 / (10 * 3000), one digit, rounded down
    assert p["accountant"].startswith("rdp (dp-accounting")
    eps = _accountant_epsilon(0.2, p["noiseMultiplier"], 40, p["delta"])
    assert p["epsilon"] == pytest.approx(eps, rel=0.01)
    if given == "noiseMultiplier":
        assert p["noiseMultiplier"] == 1.3
    else:
        assert 0.99 * 2.0 <= p["epsilon"] <= 2.0
    assert model.summary.totalIterations == 40    # tol does not stop a private fit
    assert np.all(np.isfinite(model.coefficients))


def test_noise_comes_from_the_os_not_the_seed(scaled, monkeypatch):
    _X, _y, df = scaled
    est = sparkgd.LogisticRegression(optimizer="sgd", stepSize=0.5, maxIter=5,
                                     miniBatchFraction=0.3, noiseMultiplier=1.0, seed=7)
    a, b = est.fit(df).coefficients, est.fit(df).coefficients
    assert not np.allclose(a, b)                   # same seed, other noise and samples
    monkeypatch.setenv(privacy.SEED_ENV, "5")      # tests only: breaks the guarantee
    with pytest.warns(RuntimeWarning, match="NOT private"):
        c = est.fit(df).coefficients
    with pytest.warns(RuntimeWarning):
        d = est.fit(df).coefficients
    np.testing.assert_array_equal(c, d)


def test_private_training_learns(scaled):
    """At epsilon 3 the model is still a classifier: accuracy within 5 points of the
    non-private one (3,000 rows; the benchmark measures 200,000)."""
    X, y, df = scaled
    common = dict(optimizer="adam", stepSize=0.1, maxIter=60, miniBatchFraction=0.1)
    private = sparkgd.LogisticRegression(dpEpsilon=3.0, **common).fit(df)
    plain = sparkgd.LogisticRegression(**common).fit(df)

    def accuracy(m):
        z = X @ m.coefficients + m.intercept
        return np.mean((z > 0) == (y == 1))

    assert accuracy(private) >= accuracy(plain) - 0.05, (accuracy(private), accuracy(plain))
    assert private.summary.privacy["epsilon"] <= 3.0


@pytest.mark.parametrize("params,message", [
    (dict(optimizer="lbfgs", dpEpsilon=1.0), "DP-SGD takes one noised gradient per step"),
    (dict(optimizer="gd", noiseMultiplier=1.0), "optimizer 'gd' needs exact gradients"),
    (dict(optimizer="sgd", dpEpsilon=1.0, noiseMultiplier=1.0), "not both"),
    (dict(optimizer="sgd", dpEpsilon=-1.0), "dpEpsilon must be > 0"),
    (dict(optimizer="sgd", dpEpsilon=1.0, dpDelta=1.5), "dpDelta must be in (0, 1)"),
    (dict(optimizer="sgd", dpEpsilon=1.0, maxGradNorm=0.0), "maxGradNorm must be > 0"),
    (dict(optimizer="sgd", dpEpsilon=1.0, mode="local"), "DP-SGD runs in mode sync"),
    (dict(optimizer="sgd", dpEpsilon=1.0, compression="fp16"), "use compression none"),
    (dict(optimizer="sgd", dpEpsilon=1.0, standardization=True), "scale the features"),
])
def test_what_a_private_fit_refuses(scaled, params, message):
    _X, _y, df = scaled
    with pytest.raises(SparkgdError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sparkgd.LogisticRegression(**params).fit(df)


def test_weights_above_one_are_refused(spark):
    X, y, _ = logistic_data(n=200, d=3, seed=3)
    w = np.ones(200)
    w[17] = 2.5
    df = to_df(spark, X, y, w, partitions=2)
    with pytest.raises(SparkgdError, match="row weights must be at most 1.*2.5"):
        sparkgd.LogisticRegression(optimizer="sgd", dpEpsilon=1.0, weightCol="weight").fit(df)
    w[17] = 0.5
    df = to_df(spark, X, y, w, partitions=2)
    m = sparkgd.LogisticRegression(optimizer="sgd", dpEpsilon=1.0, maxIter=3,
                                   weightCol="weight").fit(df)
    assert math.isfinite(m.summary.privacy["epsilon"])


def test_the_command_line_reports_and_saves_the_privacy_spent(spark, tmp_path, capsys):
    import json
    import os

    from sparkgd import cli

    from conftest import ROOT

    out_dir = tmp_path / "model"
    code = cli.main(["--optimizer", "momentum", "--step-size", "0.5", "--max-iter", "20",
                     "--mini-batch-fraction", "0.2", "--dp-epsilon", "1", "--dp-delta", "1e-5",
                     "--max-grad-norm", "0.5", "--output", str(out_dir)],
                    default_data=os.path.join(ROOT, "data", "sample"))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "sparkgd: privacy: epsilon 1 at delta 1e-05 (rdp (dp-accounting" in out
    p = json.load(open(out_dir / "metadata.json"))["summary"]["privacy"]
    assert p["steps"] == 20 and p["maxGradNorm"] == 0.5 and p["samplingRate"] == 0.2
    assert 0.99 <= p["epsilon"] <= 1.0
    code = cli.main(["--optimizer", "lbfgs", "--dp-epsilon", "1", "--output",
                     str(tmp_path / "x")], default_data=os.path.join(ROOT, "data", "sample"))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("sparkgd: error: dpEpsilon: DP-SGD takes one noised")


def test_empty_samples_are_steps_not_divergence(scaled):
    """At q n < 1 most steps draw no row: the step is noise and the penalty alone."""
    _X, _y, df = scaled
    m = sparkgd.LogisticRegression(optimizer="sgd", maxIter=8, miniBatchFraction=2e-4,
                                   noiseMultiplier=1.0, regParam=0.01).fit(df)
    assert m.summary.totalIterations == 8 and m.summary.privacy["steps"] == 8
    with pytest.raises(AttributeError, match="private fit computes no training metrics"):
        m.summary.accuracy
