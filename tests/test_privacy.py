"""DP-SGD's Spark-free core: the accountant against dp_accounting's own API,
clipping against a per-row loop on finite-difference gradients, and the noise.

Every registered loss is discovered from ``kernels.LOSSES``, so a new loss cannot
skip the clipping checks.
"""
import math
from importlib import metadata

import numpy as np
import pytest
import scipy.sparse as sp

from sparkgd import kernels, privacy
from sparkgd.errors import SparkgdError

ALL_LOSSES = sorted(kernels.LOSSES)


# ----------------------------------------------------------------------------
# Accounting
# ----------------------------------------------------------------------------


def reference_epsilon(q, sigma, steps, delta):
    """dp_accounting's API written out (composing with a count, not a SelfComposedDpEvent)."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    accountant.compose(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("q, sigma, steps, delta", [
    (0.01, 1.1, 1000, 1e-5), (256 / 60000, 1.1, 14000, 1e-5), (1.0, 2.0, 10, 1e-6),
    (0.1, 0.8, 50, 1e-4)])
def test_epsilon_matches_dp_accounting(q, sigma, steps, delta):
    """The same accountant (RDP, default orders, the same conversion to epsilon), so the
    same number: measured equal to the last bit with dp-accounting 0.6.0; 1e-9 leaves
    room for the library's order of summation, not for one step more or less (14,000
    steps against 14,001 differ by 3.8e-5) or another accountant."""
    assert privacy.epsilon(q, sigma, steps, delta) == pytest.approx(
        reference_epsilon(q, sigma, steps, delta), rel=1e-9)


def test_epsilon_is_monotone():
    eps = privacy.epsilon(0.01, 1.0, 1000, 1e-5)
    assert privacy.epsilon(0.01, 2.0, 1000, 1e-5) < eps          # more noise
    assert privacy.epsilon(0.01, 1.0, 4000, 1e-5) > eps          # more steps
    assert privacy.epsilon(0.002, 1.0, 1000, 1e-5) < eps         # smaller samples
    assert privacy.epsilon(0.01, 1.0, 1000, 1e-3) < eps          # a larger delta
    assert privacy.epsilon(0.5, 0.0, 10, 1e-5) == math.inf       # no noise


@pytest.mark.parametrize("target, q, steps, delta", [
    (0.1, 0.01, 100, 1e-5), (1.0, 0.01, 1000, 1e-5), (10.0, 0.001, 10000, 1e-6),
    (3.0, 1.0, 20, 1e-5)])
def test_calibrate_sigma_hits_the_target(target, q, steps, delta):
    sigma = privacy.calibrate_sigma(target, q, steps, delta)
    assert privacy.epsilon(q, sigma, steps, delta) <= target
    assert privacy.epsilon(q, 0.999 * sigma, steps, delta) > target
    assert privacy.epsilon(q, 0.99 * sigma, steps, delta) > target


@pytest.mark.parametrize("args, match", [
    ((0.0, 0.01, 100, 1e-5), "epsilon"), ((-1.0, 0.01, 100, 1e-5), "epsilon"),
    ((math.nan, 0.01, 100, 1e-5), "epsilon"), ((math.inf, 0.01, 100, 1e-5), "epsilon"),
    ((1.0, 0.0, 100, 1e-5), "q"), ((1.0, 1.5, 100, 1e-5), "q"),
    ((1.0, 0.01, 0, 1e-5), "steps"), ((1.0, 0.01, 2.5, 1e-5), "steps"),
    ((1.0, 0.01, 100, 0.0), "delta"), ((1.0, 0.01, 100, 1.0), "delta"),
    ((1e-3, 1.0, 1, 1e-10), "cannot certify")])
def test_calibrate_sigma_refuses_impossible_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        privacy.calibrate_sigma(*args)


@pytest.mark.parametrize("n, delta", [
    (569, 1e-4), (200000, 5e-7), (1, 0.1), (10, 0.01), (3, 0.03), (19, 0.005),
    (60000, 1e-6), (1000, 1e-4), (2, 0.05)])
def test_default_delta(n, delta):
    assert privacy.default_delta(n) == delta


def test_default_delta_never_exceeds_one_over_ten_n():
    for n in list(range(1, 2000)) + [10 ** k for k in range(3, 12)] + [3 * 10 ** 9 + 7]:
        delta = privacy.default_delta(n)
        digit, exponent = f"{delta:e}".split("e")
        assert float(digit) in range(1, 10)                             # one digit
        assert delta <= 0.1 / n * (1 + 1e-12) < delta + 10.0 ** int(exponent)   # rounded down
    with pytest.raises(ValueError):
        privacy.default_delta(0)


def test_accountant_names_the_library():
    assert privacy.ACCOUNTANT == f"rdp (dp-accounting {metadata.version('dp-accounting')})"


# ----------------------------------------------------------------------------
# Clipping
# ----------------------------------------------------------------------------


def labels_for(loss, n, rng, k=3):
    if loss.labels == "binary":
        return rng.integers(0, 2, size=n).astype(float)
    if loss.labels == "class":
        return rng.integers(0, k, size=n).astype(float)
    return rng.normal(size=n) * 2.0


def problem(name, fit_intercept, weighted, n=30, d=4, seed=0):
    loss = kernels.make_loss(name)
    rng = np.random.default_rng(seed)
    layout = kernels.Layout(d, loss.n_outputs(3), fit_intercept)
    X = rng.normal(size=(n, d)) * rng.uniform(0.1, 3.0, size=(n, 1))  # spread row norms
    X[rng.random((n, d)) < 0.3] = 0.0
    X[3] = 0.0                                                         # an all-zero row
    y = labels_for(loss, n, rng)
    w = rng.uniform(0.0, 1.0, size=n) if weighted else None
    theta = rng.normal(size=layout.size) * 0.5
    return loss, layout, X, y, w, theta


def per_row_gradients(X, y, w, theta, loss, layout, h=1e-6):
    """(n, size): each row's gradient of ``w_i loss(y_i, z_i(theta))``, by central
    differences in theta -- no use of the lift's formula."""
    def row_losses(t):
        coef, intercept = layout.split(t)
        value, _ = loss.value_and_derivative(y, X @ coef.T + intercept)
        return value if w is None else value * w

    G = np.empty((y.shape[0], layout.size))
    for j in range(layout.size):
        e = np.zeros(layout.size)
        e[j] = h
        G[:, j] = (row_losses(theta + e) - row_losses(theta - e)) / (2 * h)
    return G


def reference_clipped(G, C):
    total = np.zeros(G.shape[1])
    for g in G:   # the per-row loop clipped_sums avoids
        norm = np.linalg.norm(g)
        total += g * (C / norm) if norm > C else g
    return total


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("sparse", [False, True])
def test_clipped_sums_match_a_per_row_loop(name, fit_intercept, weighted, sparse):
    loss, layout, X, y, w, theta = problem(name, fit_intercept, weighted)
    G = per_row_gradients(X, y, w, theta, loss, layout)
    norms = np.linalg.norm(G, axis=1)
    C = float(np.median(norms[norms > 0]))
    assert np.any(norms > C * 1.01) and np.any((norms > 0) & (norms < C * 0.99))
    out = privacy.clipped_sums(sp.csr_matrix(X) if sparse else X, y, w, theta, loss, layout, C)
    np.testing.assert_allclose(out[2:], reference_clipped(G, C), rtol=1e-6, atol=1e-7)
    unclipped = kernels.block_sums(X, y, w, theta, loss, layout)
    np.testing.assert_allclose(out[:2], unclipped[:2], rtol=1e-12)   # loss and weight sums


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("sparse", [False, True])
def test_a_huge_clip_bound_gives_the_unclipped_sums(name, sparse):
    loss, layout, X, y, w, theta = problem(name, True, True)
    Xb = sp.csr_matrix(X) if sparse else X
    np.testing.assert_allclose(privacy.clipped_sums(Xb, y, w, theta, loss, layout, 1e12),
                               kernels.block_sums(Xb, y, w, theta, loss, layout),
                               rtol=1e-12, atol=1e-12)


def test_a_huge_clip_bound_gives_the_unclipped_sums_over_row_chunks_and_float32():
    loss, layout, X, y, w, theta = problem("logistic", True, True, n=20000, d=60)
    assert len(kernels.row_chunks(X, y, w)) > 1
    for Xb in (X, X.astype(np.float32)):
        # DP-SGD widens a float32 chunk to float64 (per-row norms): its sums are the
        # float64 ones on the rounded values
        np.testing.assert_allclose(privacy.clipped_sums(Xb, y, w, theta, loss, layout, 1e12),
                                   kernels.block_sums(Xb.astype(np.float64), y, w, theta,
                                                      loss, layout),
                                   rtol=1e-10)


def test_a_narrow_csr_block_is_widened():
    loss, layout, X, y, w, theta = problem("squared", True, False)
    X[:, -1] = 0.0
    narrow = sp.csr_matrix(X[:, :-1])
    np.testing.assert_allclose(privacy.clipped_sums(narrow, y, w, theta, loss, layout, 0.5),
                               privacy.clipped_sums(X, y, w, theta, loss, layout, 0.5),
                               rtol=1e-12)


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("sparse", [False, True])
def test_one_row_moves_the_clipped_sum_by_at_most_C(name, sparse):
    loss, layout, X, y, w, theta = problem(name, True, True)
    rng = np.random.default_rng(7)
    C = 0.7
    X1 = np.vstack([X, rng.normal(size=(1, X.shape[1])) * 1e6])   # a huge feature norm
    y1 = np.append(y, labels_for(loss, 1, rng))
    w1 = np.append(w, 1.0)
    as_block = sp.csr_matrix if sparse else np.asarray
    without = privacy.clipped_sums(as_block(X), y, w, theta, loss, layout, C)[2:]
    with_it = privacy.clipped_sums(as_block(X1), y1, w1, theta, loss, layout, C)[2:]
    moved = np.linalg.norm(with_it - without)
    assert moved <= C + 1e-12
    if name in ("squared", "huber"):   # their gradient is never 0 here: clipped to C exactly
        assert moved == pytest.approx(C, rel=1e-9)


def test_clip_bound_must_be_positive_and_finite():
    loss, layout, X, y, w, theta = problem("squared", True, False)
    for C in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="clip bound"):
            privacy.clipped_sums(X, y, w, theta, loss, layout, C)


def test_row_weights_above_one_are_refused():
    privacy.check_weights(1.0)
    privacy.check_weights(0.25)
    with pytest.raises(SparkgdError, match=r"^dpEpsilon: row weights must be at most 1 .*"
                                           r"found a weight of 3\.5$"):
        privacy.check_weights(3.5)
    with pytest.raises(SparkgdError, match="^noiseMultiplier: "):
        privacy.check_weights(np.float64(1.0000001), param="noiseMultiplier")
    with pytest.raises(SparkgdError):
        privacy.check_weights(math.nan)


# ----------------------------------------------------------------------------
# Noise
# ----------------------------------------------------------------------------


@pytest.fixture
def unseeded(monkeypatch):
    monkeypatch.delenv(privacy.SEED_ENV, raising=False)


def test_noise_differs_between_draws_whatever_the_global_seed(unseeded):
    np.random.seed(0)
    a = privacy.noise(10, 1.0, 1.0)
    np.random.seed(0)
    b = privacy.noise(10, 1.0, 1.0)
    assert not np.array_equal(a, b)
    rng = privacy.noise_generator()
    assert not np.array_equal(privacy.noise(10, 1.0, 1.0, rng), privacy.noise(10, 1.0, 1.0, rng))


def test_noise_has_std_sigma_C(unseeded):
    z = privacy.noise((200, 100), 1.3, 0.5)
    assert z.shape == (200, 100)
    assert z.std() == pytest.approx(0.65, rel=0.03)
    assert abs(z.mean()) < 0.65 * 5 / math.sqrt(z.size)


def test_the_testing_seed_reproduces_and_warns(monkeypatch):
    monkeypatch.setenv(privacy.SEED_ENV, "1234")
    with pytest.warns(RuntimeWarning, match="NOT private"):
        a = privacy.noise(5, 1.0, 2.0)
    with pytest.warns(RuntimeWarning, match="NOT private"):
        rng = privacy.noise_generator()
    np.testing.assert_array_equal(a, privacy.noise(5, 1.0, 2.0, rng))
    assert not np.array_equal(a, privacy.noise(5, 1.0, 2.0, rng))   # one generator: fresh draws
    np.testing.assert_array_equal(privacy.noise(5, 1.0, 2.0, np.random.default_rng(9)),
                                  privacy.noise(5, 1.0, 2.0, np.random.default_rng(9)))


def test_dp_step_gradient_divides_by_the_expected_batch():
    s, z = np.array([3.0, -1.0, 0.5]), np.array([0.5, 0.5, -0.5])
    np.testing.assert_allclose(privacy.dp_step_gradient(s, z, 0.01 * 500), (s + z) / 5.0)
    with pytest.raises(ValueError, match="expected batch"):
        privacy.dp_step_gradient(s, z, 0.0)
