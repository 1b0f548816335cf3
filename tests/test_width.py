"""Width: a sparse fit works at the columns its rows touch, not at the hashed space's
width (issue 25). References: SciPy's L-BFGS-B on the touched columns, NumPy's own
moments and sums, the file store's full-width fit."""
import os

import numpy as np
import pytest
import scipy.sparse as sp

import sparkgd
from sparkgd import datagen, stats
from sparkgd.data.arrow import localize, remap_columns
from sparkgd.engine import collective as co

from references import full_objective, reference_optimum


def sparse_optimum(X, y, reg):
    """SciPy's L-BFGS-B on the sparse matrix itself (L2 only): F* to the last digits."""
    from scipy.optimize import minimize

    n = y.shape[0]

    def fun(theta):
        beta, b = theta[:-1], theta[-1]
        z = X @ beta + b
        r = (0.5 * (1.0 + np.tanh(0.5 * z)) - y) / n
        return (float(np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * reg * beta @ beta),
                np.r_[X.T @ r + reg * beta, r.sum()])

    res = minimize(fun, np.zeros(X.shape[1] + 1), jac=True, method="L-BFGS-B",
                   options={"ftol": 0.0, "gtol": 1e-12, "maxiter": 5000})
    return res.fun, fun


def csr(rng, n, d, k):
    idx = np.sort(rng.choice(d, size=(n, k)), axis=1)
    X = sp.csr_matrix((rng.normal(size=n * k), idx.ravel(), np.arange(0, n * k + 1, k)),
                      shape=(n, d))
    X.sum_duplicates()
    return X


# ------------------------------------------------------------------ pure pieces


@pytest.mark.parametrize("d", [1000, 1 << 28])   # a table, and a binary search
def test_a_tasks_columns_and_moments_are_those_of_its_rows(d):
    """The columns the rows touch, re-indexed to their own and back: the same matrix;
    their moments, spread into the full width, are NumPy's block_moments of it (which
    takes the full width); nothing as wide as d is made at 2^28."""
    rng = np.random.default_rng(1)
    X = csr(rng, 300, d, 7)
    w = rng.uniform(0.5, 2.0, size=300)
    blocks = [(X[:100], np.zeros(100), w[:100]), (X[100:], np.zeros(200), w[100:])]
    cols = stats.local_columns(blocks)
    np.testing.assert_array_equal(cols, np.unique(X.indices))
    local = localize(blocks, cols)
    assert all(b[0].shape[1] == cols.size for b in local)
    moments = stats.column_moments(local, cols.size)
    assert moments.size == 2 + 2 * cols.size
    back = remap_columns(local, cols, d)
    for (A, _, _), (B, _, _) in zip(blocks, back):
        assert B.shape == A.shape
        np.testing.assert_array_equal(B.indptr, A.indptr)
        np.testing.assert_array_equal(B.indices, A.indices)
        np.testing.assert_array_equal(B.data, A.data)
    if d <= 1000:
        want = stats.merge_moments(stats.block_moments(blocks[0][0], w[:100], d),
                                   stats.block_moments(blocks[1][0], w[100:], d))
        np.testing.assert_allclose(stats.spread_moments(moments, cols, d), want,
                                   rtol=1e-10, atol=1e-12)


def test_distinct_is_numpys_unique():
    rng = np.random.default_rng(2)
    for size in (0, 1, 2, 1000):
        a = rng.integers(-5, 50, size=size)
        np.testing.assert_array_equal(stats.distinct(a), np.unique(a))


def test_exact_sums_travel_sparse_where_few_are_non_zero():
    """Fewer than half the gradient's values non-zero: positions and values (16 bytes a
    non-zero, always fewer than the dense 8 a value), read back to the same vector;
    otherwise the vector itself. Sizes that are neither are refused."""
    rng = np.random.default_rng(3)
    n = 1000
    sums = np.zeros(2 + n)
    sums[:2] = [3.5, 10.0]
    sums[2 + rng.choice(n, 100, replace=False)] = rng.normal(size=100)
    data = co.pack_exact(sums)
    assert isinstance(data, bytes) and len(data) == 16 + 16 * 100 < 8 * (2 + n)
    np.testing.assert_array_equal(co.unpack_sums(data, co.codecs.NONE, n), sums)
    dense = rng.normal(size=2 + n)
    assert isinstance(co.pack_exact(dense), np.ndarray)
    assert co.exact_size_ok(16 + 8 * n, n) and co.exact_size_ok(16 + 16 * 499, n)
    assert not co.exact_size_ok(16 + 16 * 501, n) and not co.exact_size_ok(17, n)
    bad = bytearray(data)
    bad[16:24] = (n + 5).to_bytes(8, "little")          # a position out of range
    with pytest.raises(co.codecs.CodecError, match="ascending in range"):
        co.unpack_sums(bytes(bad), co.codecs.NONE, n)


# ------------------------------------------------------------------ fits


@pytest.fixture(scope="module")
def hashed(tmp_path_factory):
    """Click-log rows hashed into 2^20 columns: 3,000 rows, 40 fields, Zipf values."""
    path = str(tmp_path_factory.mktemp("hashed") / "data")
    X, y = datagen.write_hashed(path, rows=3000, bits=20, partitions=2, seed=3)
    return path, X, y


def test_a_hashed_fit_works_at_the_touched_columns_and_saves_at_full_width(spark, hashed,
                                                                            tmp_path):
    """lbfgs on 2^20 hashed columns: the optimum of SciPy on the touched columns to
    1e-9; the model is 2^20 wide, exactly zero where no row has a value; the passes
    moved vectors of the touched width (theta out, sparse sums back), not 2^20."""
    path, X, y = hashed
    cols = np.unique(X.indices)
    assert cols.size < X.shape[1] / 20
    Xc = X[:, cols]
    f_star, fun = sparse_optimum(Xc, y, 1e-3)
    df = sparkgd.read_libsvm(spark, path, num_features=1 << 20)
    model = sparkgd.LogisticRegression(regParam=1e-3, tol=1e-12, maxIter=200).fit(df)
    coef = model.coefficients
    assert coef.shape == (1 << 20,) and model.numFeatures == 1 << 20
    outside = np.ones(1 << 20, dtype=bool)
    outside[cols] = False
    assert not np.any(coef[outside])
    got = fun(np.r_[coef[cols], model.intercept])[0]
    assert got - f_star < 1e-9 * abs(f_star), (got, f_star)
    s = model.summary
    assert s.engine == "served, sealed"
    # every pass: vectors of the touched width on a tree of 2 -- theta to task 0 and on
    # to task 1, the sums back up: 4 x 8 bytes a touched column, and the first passes
    # more (theta in full) -- where one vector of the full width is 8 MiB
    per_pass = s.bytesCommunicated / s.numEvaluations
    assert per_pass < 5 * 8 * (cols.size + 2) < 8 * (1 << 20)
    path_out = str(tmp_path / "m")
    model.save(path_out)
    saved = np.load(os.path.join(path_out, "coefficients.npy"))
    assert saved.shape == (1 << 20,) and np.array_equal(saved, coef)


def test_the_touched_columns_fit_is_the_full_width_fit(spark, hashed):
    """The same data on the file store (no compaction: the full width, one Spark job a
    pass) and on the served store (the touched columns): the same model to 1e-9, and a
    warm start from the full-width model is taken at the touched columns."""
    import sparkgd.engine as engine_mod

    path, X, y = hashed
    df = sparkgd.read_libsvm(spark, path, num_features=1 << 20)
    est = sparkgd.LogisticRegression(regParam=1e-2, tol=1e-12, maxIter=200)
    compact = est.fit(df)
    real_open = engine_mod.Engine.open

    def on_files(*args, **kwargs):
        kwargs["store"] = "files"
        return real_open(*args, **kwargs)

    engine_mod.Engine.open = on_files
    try:
        full = est.fit(df)
    finally:
        engine_mod.Engine.open = real_open
    assert full.summary.engine != compact.summary.engine
    np.testing.assert_allclose(compact.coefficients, full.coefficients, rtol=0, atol=1e-6)
    assert abs(compact.summary.objectiveHistory[-1] - full.summary.objectiveHistory[-1]) < \
        1e-9 * compact.summary.objectiveHistory[-1]
    warm = sparkgd.LogisticRegression(regParam=1e-2, tol=1e-12, maxIter=200,
                                      initialModel=compact).fit(df)
    assert warm.summary.totalIterations <= 2
    np.testing.assert_allclose(warm.coefficients, compact.coefficients, rtol=0, atol=1e-6)


@pytest.mark.parametrize("spec,bound", [("topk:0.1", 1.5e-5), ("qsgd:8", 1e-8),
                                        ("fp16", 1e-5)])
def test_gd_with_compressed_gradients_reaches_the_optimum_on_real_data(spark, cancer, spec,
                                                                       bound):
    """gd's line search with compressed gradients on the breast-cancer data (issue 25:
    top-k stopped 3.7e-3 above the optimum, qsgd:8 0.74, fp16 9.1e-4): where a compressed
    gradient leads nowhere the search goes on with exact ones; 1,000 iterations end as
    gradient descent with exact gradients does (the README's figures, measured here:
    topk:0.1 3.4e-6, qsgd:8 2.4e-9 (-2e-11 when Spark grouped the rows: qsgd's random
    rounding follows the grouping), fp16 1.4e-6, none 4.4e-6). Bounds (issue 29): about
    4x, 4x and 7x those."""
    df, X, y = cancer
    _, f_star = reference_optimum(X, y, None, "logistic", reg=0.01)
    m = sparkgd.LogisticRegression(regParam=0.01, optimizer="gd", maxIter=1000, tol=0.0,
                                   compression=spec).fit(df)
    theta = np.r_[m.coefficients, m.intercept]
    gap = full_objective(theta, X, y, None, "logistic", 1, 0.01, 0.0) - f_star
    assert gap < bound, (spec, gap)
