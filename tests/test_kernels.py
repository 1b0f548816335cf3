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


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("weighted", [False, True])
def test_summed_is_the_weighted_sum_of_value_and_derivative(name, weighted):
    """``Loss.summed`` (the pass's form: a loss may fold the sum into its own formula)
    equals the row values and derivatives summed with the weights, extreme margins
    included; it may overwrite its z, so it gets a copy."""
    loss = kernels.make_loss(name)
    rng = np.random.default_rng(7)
    n, k = 1300, loss.n_outputs(3)    # two of logistic's product groups and a tail
    y = labels_for(loss, n, rng)
    z = rng.normal(size=(n, k)) * 4.0
    z[:6] = np.array([[-800.0], [800.0], [-40.0], [40.0], [0.0], [1e-300]])
    w = rng.uniform(0.1, 3.0, size=n) if weighted else None
    v, dz = loss.value_and_derivative(y, z.copy())
    want = v.sum() if w is None else v @ w
    got, gdz = loss.summed(y, z.copy(), w)
    scale = np.abs(v).sum() if w is None else np.abs(v) @ w
    assert abs(got - want) <= 1e-14 * scale + 1e-300, (got, want)
    np.testing.assert_allclose(gdz, dz if w is None else dz * w[:, None],
                               rtol=1e-14, atol=1e-300)


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


def float32_bound(X, y, theta, loss, layout):
    """What float32 products may change in ``[loss_sum, weight_sum, grad...]``: each
    margin and each gradient term is a float32 product sum, off by at most about
    ``d * eps32`` of the sum of its terms' magnitudes (BLAS adds in float32 within a
    chunk); 4x that, in float64, from the float64 values."""
    X = np.asarray(X, dtype=np.float64)
    coef, intercept = layout.split(theta)
    z = X @ coef.T + intercept
    zscale = np.abs(X) @ np.abs(coef.T) + np.abs(intercept)
    _, dz = loss.value_and_derivative(y, z)
    eps = 4 * (layout.d + 1) * np.finfo(np.float32).eps
    grad = np.abs(dz).T @ np.abs(X) + (np.abs(dz).T @ zscale) * np.abs(X).max(axis=0)
    head = [float((np.abs(dz) * zscale).sum()), 0.0]
    return eps * np.r_[head, grad.ravel(), np.abs(dz).sum(axis=0)]


def test_float32_blocks_are_multiplied_in_float32_within_its_rounding():
    """A float32 chunk is multiplied as float32 (BLAS reads half the bytes), the loss
    and every sum across chunks in float64: the sums differ from the float64
    computation on the same values by float32's rounding of the products, no more."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(3000, 7)).astype(np.float32)
    y = (rng.uniform(size=3000) < 0.5).astype(float)
    layout = kernels.Layout(7, 1, True)
    theta = rng.normal(size=layout.size)
    loss = kernels.make_loss("logistic")
    got = kernels.block_sums(X, y, None, theta, loss, layout)
    ref = kernels.block_sums(X.astype(np.float64), y, None, theta, loss, layout)
    bound = float32_bound(X, y, theta, loss, layout)
    assert np.all(np.abs(got - ref) <= bound), np.abs(got - ref) / bound
    assert got[1] == 3000 and np.any(got != ref)      # float32 arithmetic, not widened
    assert np.abs(got - ref).max() <= 1e-6 * np.abs(ref).max()


def test_float32_chunks_across_blocks_threads_and_csr_stay_within_rounding():
    """Blocks of growing and shrinking size, several chunks each, with a CSR piece and
    two threads: every sum is the float64 computation on the same values to float32's
    rounding of the products; the float64 widening helper (DP clipping, metrics)
    reuses one buffer a thread."""
    import sparkgd.kernels as K

    rng = np.random.default_rng(4)
    layout = kernels.Layout(50, 1, True)
    theta = rng.normal(size=layout.size) * 0.1
    loss = kernels.make_loss("logistic")
    sizes = [30000, 2000, 45000, 700]  # several chunks in the larger blocks
    blocks32 = [(rng.normal(size=(n, 50)).astype(np.float32),
                 (rng.uniform(size=n) < 0.5).astype(float), None) for n in sizes]
    blocks64 = [(X.astype(np.float64), y, w) for X, y, w in blocks32]
    csr = sp.random(300, 50, density=0.1, format="csr", random_state=5)
    ycsr = (rng.uniform(size=300) < 0.5).astype(float)
    bound = sum(float32_bound(X, y, theta, loss, layout) for X, y, _ in blocks32)
    for threads in (1, 2):
        got = kernels.partition_sums(blocks32 + [(csr, ycsr, None)], theta, loss, layout,
                                     threads=threads)
        ref = kernels.partition_sums(blocks64 + [(csr, ycsr, None)], theta, loss, layout,
                                     threads=threads)
        assert np.all(np.abs(got - ref) <= bound)
    K.as_float64(blocks32[0][0][:5000], 50)
    first = K._WIDE.buf
    K.as_float64(blocks32[1][0], 50)
    assert first is not None and K._WIDE.buf is first  # a smaller chunk reuses it




def test_chunk_bytes_follow_the_last_level_cache_share(tmp_path):
    """An eighth of the largest cache level's share a core, within [1, 8] MiB; the
    default where sysfs says nothing."""
    def cache(index, level, size, cpus):
        d = tmp_path / f"index{index}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "size").write_text(f"{size}\n")
        (d / "shared_cpu_list").write_text(f"{cpus}\n")

    cache(0, 1, "32K", "0")
    cache(2, 2, "512K", "0")
    cache(3, 3, "32768K", "0-1")
    assert kernels.cache_chunk_bytes(str(tmp_path)) == 2 << 20      # 16 MiB a core / 8
    (tmp_path / "index3" / "shared_cpu_list").write_text("0-7,16-23\n")
    assert kernels.cache_chunk_bytes(str(tmp_path)) == 1 << 20      # 2 MiB a core: floor
    (tmp_path / "index3" / "size").write_text("1G\n")
    assert kernels.cache_chunk_bytes(str(tmp_path)) == 8 << 20      # capped
    assert kernels.cache_chunk_bytes(str(tmp_path / "none"), default=123) == 123
    X32 = np.zeros((300_000, 10), dtype=np.float32)
    rows = [c[0].shape[0] for c in kernels.row_chunks(X32, np.zeros(300_000), None)]
    assert rows[0] == kernels.CHUNK_BYTES // 40 and sum(rows) == 300_000


def test_read_sums_read_every_stored_value_once():
    """The floor pass (work mode "read"): the sum of the dense values as stored and of a
    CSR block's values and column indices, and the rows; threads change nothing."""
    from sparkgd import work

    rng = np.random.default_rng(5)
    dense = rng.normal(size=(9000, 40))
    csr = sp.random(500, 40, density=0.2, format="csr", random_state=2)
    blocks = [(dense, np.zeros(9000), None), (dense[:100].astype(np.float32), np.zeros(100),
                                                None), (csr, np.zeros(500), None)]
    want = dense.sum() + dense[:100].astype(np.float32).astype(float).sum() \
        + csr.data.sum() + csr.indices.sum()
    layout = kernels.Layout(40, 1, True)
    reader = work.parse({"mode": "read"}, layout)
    assert reader.size(layout) == 2
    for threads in (1, 2):
        got = reader.compute(blocks, None, None, layout, None, 0, threads=threads)
        assert got[1] == 9600 and abs(got[0] - want) <= 1e-9 * np.abs(dense).sum()
