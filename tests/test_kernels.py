"""Losses against finite differences; the lifted kernel against a direct formula.

Every registered loss is discovered from ``kernels.LOSSES``, so a new loss
cannot skip these checks.
"""
import numpy as np
import pytest
import scipy.sparse as sp

from sparkgd import kernels

ALL_LOSSES = sorted(kernels.LOSSES)


def labels_for(loss, n, rng, k=3):
    if loss.labels == "binary":
        return rng.integers(0, 2, size=n).astype(float)
    if loss.labels == "class":
        return rng.integers(0, k, size=n).astype(float)
    return rng.normal(size=n) * 2.0


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_derivative_matches_finite_differences(name):
    loss = kernels.make_loss(name)
    rng = np.random.default_rng(1)
    n, k = 40, loss.n_outputs(3)
    y = labels_for(loss, n, rng)
    z = rng.normal(size=(n, k)) * 3.0
    _, dz = loss.value_and_derivative(y, z)
    h = 1e-6
    for j in range(k):
        e = np.zeros_like(z)
        e[:, j] = h
        fp, _ = loss.value_and_derivative(y, z + e)
        fm, _ = loss.value_and_derivative(y, z - e)
        np.testing.assert_allclose((fp - fm) / (2 * h), dz[:, j], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_loss_is_finite_for_extreme_margins(name):
    loss = kernels.make_loss(name)
    rng = np.random.default_rng(2)
    y = labels_for(loss, 6, rng)
    z = np.array([[-800.0], [800.0], [-40.0], [40.0], [0.0], [1e-300]])
    z = np.repeat(z, loss.n_outputs(3), axis=1)
    v, dz = loss.value_and_derivative(y, z)
    assert np.all(np.isfinite(v)) and np.all(np.isfinite(dz))


def test_logistic_formula():
    loss = kernels.make_loss("logistic")
    y = np.array([0.0, 1.0, 1.0])
    z = np.array([[0.3], [-2.0], [5.0]])
    v, dz = loss.value_and_derivative(y, z)
    np.testing.assert_allclose(v, np.log1p(np.exp(z[:, 0])) - y * z[:, 0], rtol=1e-14)
    np.testing.assert_allclose(dz[:, 0], 1 / (1 + np.exp(-z[:, 0])) - y, rtol=1e-14)


def test_squared_formula():
    loss = kernels.make_loss("squared")
    y = np.array([1.0, -2.0])
    z = np.array([[0.5], [1.0]])
    v, dz = loss.value_and_derivative(y, z)
    np.testing.assert_allclose(v, 0.5 * (y - z[:, 0]) ** 2)
    np.testing.assert_allclose(dz[:, 0], z[:, 0] - y)


def objective(theta, X, y, w, loss, layout):
    s = kernels.block_sums(X, y, w, theta, loss, layout)
    return s[0] / s[1], s[2:] / s[1]


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("weighted", [True, False])
def test_lifted_gradient_matches_finite_differences(name, fit_intercept, weighted):
    loss = kernels.make_loss(name)
    rng = np.random.default_rng(3)
    n, d = 50, 4
    X = rng.normal(size=(n, d))
    y = labels_for(loss, n, rng)
    w = rng.uniform(0.5, 2.0, n) if weighted else None
    layout = kernels.Layout(d, loss.n_outputs(3), fit_intercept)
    theta = rng.normal(size=layout.size) * 0.5
    _, g = objective(theta, X, y, w, loss, layout)
    h = 1e-6
    fd = np.array([
        (objective(theta + h * e, X, y, w, loss, layout)[0]
         - objective(theta - h * e, X, y, w, loss, layout)[0]) / (2 * h)
        for e in np.eye(layout.size)])
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_dense_and_csr_blocks_agree(name):
    loss = kernels.make_loss(name)
    rng = np.random.default_rng(4)
    n, d = 60, 12
    X = rng.normal(size=(n, d)) * (rng.random((n, d)) < 0.2)
    y = labels_for(loss, n, rng)
    w = rng.uniform(0.5, 2.0, n)
    layout = kernels.Layout(d, loss.n_outputs(3), True)
    theta = rng.normal(size=layout.size)
    dense = kernels.block_sums(X, y, w, theta, loss, layout)
    csr = kernels.block_sums(sp.csr_matrix(X), y, w, theta, loss, layout)
    np.testing.assert_allclose(csr, dense, rtol=1e-12, atol=1e-12)


def test_partition_sums_is_sum_of_blocks_and_empty_is_zero():
    loss = kernels.make_loss("logistic")
    rng = np.random.default_rng(5)
    X = rng.normal(size=(30, 3))
    y = rng.integers(0, 2, 30).astype(float)
    layout = kernels.Layout(3, 1, True)
    theta = rng.normal(size=layout.size)
    whole = kernels.block_sums(X, y, None, theta, loss, layout)
    parts = kernels.partition_sums([(X[:10], y[:10], None), (X[10:], y[10:], None)],
                                   theta, loss, layout)
    np.testing.assert_allclose(parts, whole, rtol=1e-13)
    assert kernels.partition_sums([], theta, loss, layout).tolist() == [0.0] * (2 + layout.size)


def test_layout_split_join_roundtrip():
    layout = kernels.Layout(4, 3, True)
    theta = np.arange(layout.size, dtype=float)
    coef, b = layout.split(theta)
    assert coef.shape == (3, 4) and b.shape == (3,)
    np.testing.assert_array_equal(layout.join(coef, b), theta)
    nob = kernels.Layout(4, 1, False)
    coef, b = nob.split(np.ones(4))
    assert b.tolist() == [0.0] and nob.size == 4


def test_unknown_loss_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        kernels.make_loss("nope")


def test_feature_moments_match_numpy_weighted_unbiased():
    from sparkgd import stats

    rng = np.random.default_rng(6)
    X = rng.normal(size=(40, 4)) * [1.0, 10.0, 0.0, 1e4] + [0.0, 5.0, 2.0, 1.7e9]
    w = rng.uniform(0.5, 2.0, 40)
    parts = [stats.block_moments(X[:15], w[:15], 4), stats.block_moments(X[15:], w[15:], 4)]
    mean, std = stats.moments_from_merged(stats.merge_moments(*parts), 4)
    ref_mean = w @ X / w.sum()
    ref_var = (w @ (X - ref_mean) ** 2) / (w.sum() - (w @ w) / w.sum())
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-12)
    np.testing.assert_allclose(std[[0, 1, 3]], np.sqrt(ref_var[[0, 1, 3]]), rtol=1e-9)
    assert std[2] == 0.0  # constant column: exactly 0, while a timestamp-like one is not
    sparse_cols = X[:, :3]
    csr = stats.block_moments(sp.csr_matrix(sparse_cols), w, 3)
    np.testing.assert_allclose(csr, stats.block_moments(sparse_cols, w, 3), rtol=1e-10,
                               atol=1e-12)
    unweighted = stats.moments_from_merged(stats.block_moments(X, None, 4), 4)[1]
    np.testing.assert_allclose(unweighted[[0, 1, 3]], X[:, [0, 1, 3]].std(axis=0, ddof=1),
                               rtol=1e-9)


@pytest.mark.parametrize("k,fit_intercept", [(1, True), (3, True), (1, False)])
def test_preconditioner_is_an_exact_change_of_variables(k, fit_intercept):
    from sparkgd import stats

    rng = np.random.default_rng(7)
    d = 4
    layout = kernels.Layout(d, k, fit_intercept)
    mean, std = rng.normal(size=d) * 10, np.array([2.0, 0.5, 0.0, 30.0])
    pre = stats.Preconditioner(mean, std, layout)
    u = rng.normal(size=layout.size)
    theta = pre.to_theta(u)
    np.testing.assert_allclose(pre.from_theta(theta), u, rtol=1e-12, atol=1e-12)
    # grad_to_u is the transpose of to_theta (a linear map): <g, T u> == <T^T g, u>
    g = rng.normal(size=layout.size)
    np.testing.assert_allclose(g @ pre.to_theta(u), pre.grad_to_u(g) @ u, rtol=1e-12)
    # margins in u-space are the centred, scaled features
    X = rng.normal(size=(5, d)) * 3 + mean
    coef, b = layout.split(theta)
    cu = u[: k * d].reshape(k, d)
    bu = u[k * d:] if fit_intercept else np.zeros(k)
    Xs = (X - (mean * (std > 0) if fit_intercept else 0)) / np.where(std > 0, std, 1.0)
    np.testing.assert_allclose(kernels.margins(X, coef, b), Xs @ cu.T + bu, rtol=1e-10)


def test_fused_chunks_give_the_same_sums(monkeypatch):
    rng = np.random.default_rng(8)
    X = rng.normal(size=(3000, 7))
    y = rng.integers(0, 2, 3000).astype(float)
    w = rng.uniform(0.5, 2, 3000)
    loss, layout = kernels.make_loss("logistic"), kernels.Layout(7, 1, True)
    theta = rng.normal(size=layout.size)
    whole = kernels._block_sums(X, y, w, theta, loss, layout)
    monkeypatch.setattr(kernels, "CHUNK_BYTES", 8 * 7 * 300)  # 300-row chunks -> 10+ chunks
    chunked = kernels.block_sums(X, y, w, theta, loss, layout)
    np.testing.assert_allclose(chunked, whole, rtol=1e-12)


def test_threads_do_not_change_the_sums(monkeypatch):
    rng = np.random.default_rng(9)
    blocks = [(rng.normal(size=(2000, 5)), rng.integers(0, 2, 2000).astype(float), None),
              (rng.normal(size=(700, 5)), rng.integers(0, 2, 700).astype(float), None)]
    loss, layout = kernels.make_loss("logistic"), kernels.Layout(5, 1, True)
    theta = rng.normal(size=layout.size)
    monkeypatch.setattr(kernels, "CHUNK_BYTES", 8 * 5 * 256)  # many chunks
    one = kernels.partition_sums(blocks, theta, loss, layout, threads=1)
    three = kernels.partition_sums(blocks, theta, loss, layout, threads=3)
    np.testing.assert_array_equal(one, three)
    sampled = [kernels.partition_sums(blocks, theta, loss, layout, sample=(0.5, 1, 2, 0),
                                      threads=t) for t in (1, 2)]
    np.testing.assert_array_equal(sampled[0], sampled[1])


def test_float32_blocks_sum_like_their_float64_values():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(3000, 7)).astype(np.float32)
    y = (rng.uniform(size=3000) < 0.5).astype(float)
    layout = kernels.Layout(7, 1, True)
    theta = rng.normal(size=layout.size)
    loss = kernels.make_loss("logistic")
    got = kernels.block_sums(X, y, None, theta, loss, layout)
    ref = kernels.block_sums(X.astype(np.float64), y, None, theta, loss, layout)
    np.testing.assert_array_equal(got, ref)


def test_float32_chunks_reuse_one_buffer_and_stay_exact():
    """Blocks of growing and shrinking size, several chunks each, with a CSR piece and
    two threads: every sum equals the float64 computation on the same values."""
    import sparkgd.kernels as K

    rng = np.random.default_rng(4)
    layout = kernels.Layout(50, 1, True)
    theta = rng.normal(size=layout.size) * 0.1
    loss = kernels.make_loss("logistic")
    sizes = [30000, 2000, 45000, 700]  # 30000 x 50 x 8 bytes: 3 chunks of 4 MB
    blocks32 = [(rng.normal(size=(n, 50)).astype(np.float32),
                 (rng.uniform(size=n) < 0.5).astype(float), None) for n in sizes]
    blocks64 = [(X.astype(np.float64), y, w) for X, y, w in blocks32]
    csr = sp.random(300, 50, density=0.1, format="csr", random_state=5)
    ycsr = (rng.uniform(size=300) < 0.5).astype(float)
    for threads in (1, 2):
        got = kernels.partition_sums(blocks32 + [(csr, ycsr, None)], theta, loss, layout,
                                     threads=threads)
        ref = kernels.partition_sums(blocks64 + [(csr, ycsr, None)], theta, loss, layout,
                                     threads=threads)
        np.testing.assert_allclose(got, ref, rtol=1e-13, atol=1e-12)
    first = K._WIDE.buf
    kernels.block_sums(*blocks32[1], theta, loss, layout)
    assert K._WIDE.buf is first  # a smaller chunk reuses this thread's buffer
