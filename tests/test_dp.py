"""DP-SGD end to end: the engine's clipped sums against NumPy, the accountant's epsilon in
the summary, noise that no seed replays, and every refusal (one clear error each)."""
import math

import numpy as np
import pytest
from scipy.special import expit

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


def numpy_clipped_sums(X, y, theta, C):
    """``[loss_sum, weight_sum, clipped gradient sum]`` of the logistic loss, unweighted,
    with an intercept, written out per row in NumPy (not sparkgd's kernels or
    privacy.clipped_sums): ``g_i = (sigmoid(z_i) - y_i) [x_i, 1]``, scaled by
    ``min(1, C / ||g_i||)``, summed."""
    beta, b = theta[:-1], theta[-1]
    z = X @ beta + b
    out = np.zeros(theta.size + 2)
    out[0] = np.sum(np.logaddexp(0.0, z) - y * z)
    out[1] = y.shape[0]
    for x_i, z_i, y_i in zip(X, z, y):
        g = (expit(z_i) - y_i) * np.append(x_i, 1.0)          # sigmoid(z) - y
        norm = np.linalg.norm(g)
        out[2:] += g * min(1.0, C / norm) if norm > 0 else g
    return out


def test_the_engine_sums_clipped_gradients_as_numpy_does(spark, scaled):
    """One DP pass over all rows (q = 1) through the serving tasks equals per-example
    clipping written out in NumPy (:func:`numpy_clipped_sums`), then the sum."""
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
        # at C = 0.7 about half the rows are clipped (at 0.3 all of them)
        half = eng.evaluate(theta, loss, layout, (1.0, 123, 2), work={"mode": "dp", "clip": 0.7})
    want = numpy_clipped_sums(X, y, theta, 0.3)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(half, numpy_clipped_sums(X, y, theta, 0.7), rtol=1e-12,
                               atol=1e-12)
    # the huge row moved the gradient sum by at most C
    rest = numpy_clipped_sums(np.delete(X, 7, 0), np.delete(y, 7), theta, 0.3)
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
    assert p["epsilon"] == pytest.approx(eps, rel=1e-9)     # the same accountant: equal
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


# ------------------------------------------------ the noise a private step adds (issue 29)

#: One private fit's noise, checked: sgd steps over ``NOISE_WIDTH`` coordinates
#: (``NOISE_STEPS`` x ``NOISE_WIDTH`` >= 2000 draws).
NOISE_WIDTH, NOISE_STEPS = 250, 10
NOISE_SIGMA, NOISE_CLIP, NOISE_Q, NOISE_LR = 1.3, 0.5, 0.5, 0.5


def noise_data(n=200, d=NOISE_WIDTH - 1, seed=5):
    """Rows of norm <= 1 and their labels, wide enough for ``NOISE_WIDTH`` values a step."""
    X, y, _ = logistic_data(n=n, d=d, seed=seed)
    return X / np.maximum(1.0, np.linalg.norm(X, axis=1))[:, None], y


def private_plan(n, d):
    """dp.fit's arguments for sgd at the constants above (sigma given: no calibration;
    no penalty, start at zero)."""
    from sparkgd import coordinator
    from sparkgd.modes import Keep, Problem
    from sparkgd.penalties import Penalty

    layout = kernels.Layout(d, 1, True)
    problem = Problem(kernels.make_loss("logistic"), layout, Penalty(layout),
                      np.zeros(layout.size), weight=float(n), rows=n)
    plan = coordinator.Plan(model="logistic", spec=None, optimizer="sgd",
                            step_size=NOISE_LR, max_iter=NOISE_STEPS, tol=0.0,
                            mini_batch_fraction=NOISE_Q,
                            dp={"clip": NOISE_CLIP, "sigma": NOISE_SIGMA})
    return problem, plan, Keep()


def record_private_passes(engine):
    """Wrap ``engine.evaluate``: every DP pass's (theta, sample, work, sums) is kept."""
    real, passes = engine.evaluate, []

    def evaluate(theta, loss, layout, sample=None, codec=None, theta_codec=None, work=None):
        kw = {} if codec is None else {"codec": codec, "theta_codec": theta_codec}
        out = real(theta, loss, layout, sample, work=work, **kw)
        if work is not None and work.get("mode") == "dp":
            passes.append((np.array(theta, dtype=float), tuple(sample), dict(work),
                           np.array(out, dtype=float)))
        return out

    engine.evaluate = evaluate
    return passes


def step_noise(passes, n, result_theta):
    """The noise of each sgd step of a private fit: sgd moves theta_t to
    ``theta_t - lr / sqrt(t + 1) * g_t`` with ``g_t`` the noised gradient (no penalty), and
    the noiseless clipped step is ``S_t / (q n)``, ``S_t`` the clipped sums the engine
    returned for that pass (the same sample) -> (steps, width) of ``g_t - S_t / (q n)``."""
    thetas = [p[0] for p in passes] + [result_theta]
    out = []
    for t in range(NOISE_STEPS):
        g = -(passes[t + 1][0] - passes[t][0]) * np.sqrt(t + 1) / NOISE_LR
        out.append(g - passes[t][3][2:] / (NOISE_Q * n))
    assert np.array_equal(thetas[NOISE_STEPS], result_theta)   # the last step is the model's
    return np.array(out)


def assert_noise_is_dp_sgds(passes, n, result_theta):
    """Every step: a fresh Gaussian of std sigma C / (q n) on every coordinate (the noise
    N(0, sigma^2 C^2) on the clipped sum, over the expected batch q n;
    sparkgd/privacy.py). Over NOISE_STEPS x NOISE_WIDTH draws the sample std is within
    10% of that (its own spread is 1.4%: no noise, or half of it, is far out) and the
    mean within 4 standard errors of 0."""
    assert len(passes) == NOISE_STEPS + 1               # iterations 0 .. maxIter
    secret = passes[0][1][1]
    for t, (_theta, sample, work, _sums) in enumerate(passes):
        assert sample == (NOISE_Q, secret, t)           # Poisson rate q, one secret seed
        assert work == {"mode": "dp", "clip": NOISE_CLIP}
    noise = step_noise(passes, n, result_theta)
    assert noise.size >= 2000
    want = NOISE_SIGMA * NOISE_CLIP / (NOISE_Q * n)
    std, mean = noise.std(), noise.mean()
    assert abs(std / want - 1) <= 0.10, (std, want)
    assert abs(mean) <= 4 * want / np.sqrt(noise.size), (mean, want)
    # each step draws afresh: no two steps' noise alike
    corr = np.corrcoef(noise)[np.triu_indices(NOISE_STEPS, 1)]
    assert np.abs(corr).max() < 0.5, corr


class NumpyEngine:
    """What dp.fit asks of an engine, in NumPy: a pass with ``sample = (q, seed, t)`` and
    DP work sums :func:`numpy_clipped_sums` over a Poisson sample drawn here; without,
    the plain sums (the objective's history)."""

    bytes_communicated = driver_bytes = 0

    def __init__(self, X, y):
        self.X, self.y = X, y

    def evaluate(self, theta, loss, layout, sample=None, codec=None, theta_codec=None,
                 work=None):
        if sample is None:
            return numpy_clipped_sums(self.X, self.y, theta, 1e300)
        q, seed, t = sample
        rows = np.random.default_rng([seed, t]).random(self.y.shape[0]) < q
        return numpy_clipped_sums(self.X[rows], self.y[rows], theta, work["clip"])


def test_a_private_steps_noise_is_gaussian_of_std_sigma_C_over_q_n(monkeypatch):
    """No Spark: modes/dp.py's fit over :class:`NumpyEngine` (the driver's side whole --
    the private objective, its noise, the expected batch, sgd's steps), at a fixed
    testing seed so the draws are always the same."""
    from sparkgd.modes import dp

    monkeypatch.setenv(privacy.SEED_ENV, "29")
    # the summary's accountant (dp-accounting's import alone takes a second) is checked
    # above; here it only has to answer
    monkeypatch.setattr(privacy, "epsilon", lambda q, sigma, steps, delta: 1.0)
    X, y = noise_data()
    engine = NumpyEngine(X, y)
    passes = record_private_passes(engine)
    with pytest.warns(RuntimeWarning, match="NOT private"):
        result = dp.fit(engine, *private_plan(*X.shape))
    assert result.privacy["noiseMultiplier"] == NOISE_SIGMA
    assert_noise_is_dp_sgds(passes, X.shape[0], result.theta)


@pytest.mark.parametrize("kind", ["served", "jobs"])
def test_a_private_fits_noise_is_gaussian_of_std_sigma_C_over_q_n_on_spark(spark, kind,
                                                                           monkeypatch):
    """The same check over Spark: the served engine, and one Spark job per pass (the file
    store, engine kind ``jobs``); the noiseless step is the engine's own clipped sums of
    the pass (the same Poisson sample)."""
    from sparkgd import data, engine, work
    from sparkgd.modes import dp

    monkeypatch.setenv(privacy.SEED_ENV, "29")
    X, y = noise_data()
    df = to_df(spark, X, y, partitions=2)
    spec = data.resolve_input(df.schema, "features", None, "label", None)
    opts = {"store": "files", "per_pass": "jobs"} if kind == "jobs" else {}
    with engine.Engine.open(df, spec, parse_work=work.parse, **opts) as eng:
        assert eng.kind == kind
        passes = record_private_passes(eng)
        with pytest.warns(RuntimeWarning, match="NOT private"):
            result = dp.fit(eng, *private_plan(*X.shape))
    assert_noise_is_dp_sgds(passes, X.shape[0], result.theta)
    # the engine drew a sample of about q n rows a pass
    drawn = np.array([p[3][1] for p in passes])
    assert np.all(np.abs(drawn - NOISE_Q * X.shape[0]) < 5 * np.sqrt(X.shape[0] * 0.25))
