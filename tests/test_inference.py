"""Coefficient statistics (sparkgd.inference) against the textbook formulas written here
in NumPy/SciPy: weighted least squares on real data (t with n - p degrees of freedom) and
binomial logistic regression (Wald z from the inverse Fisher information); through a
fit on Spark, saved and loaded; and the clear errors (penalized fits, too many features,
collinear columns)."""
import numpy as np
import pytest
from scipy import optimize, stats

import sparkgd
from sparkgd import inference, kernels
from sparkgd.errors import SparkgdError

from conftest import ROOT, logistic_data, to_df

#: breast-cancer columns: texture, smoothness, symmetry, fractal dimension, texture se
#: (real measurements, not collinear) explain mean radius (column 0)
CANCER_X, CANCER_Y = [1, 4, 8, 9, 11], 0


def cancer_arrays():
    """The breast-cancer columns above, read with pyarrow (no Spark)."""
    import os

    import pyarrow.parquet as pq

    table = pq.read_table(os.path.join(ROOT, "data", "breast_cancer"))
    X = np.array(table.column("features").to_pylist())
    return X[:, CANCER_X], X[:, CANCER_Y]


def wls_reference(X, y, w):
    """beta (intercept last), standard errors, t, p, dof, dispersion of weighted least
    squares, as a textbook gives them."""
    A = np.c_[X, np.ones(len(y))]
    sw = np.sqrt(w)
    beta, *_ = np.linalg.lstsq(A * sw[:, None], y * sw, rcond=None)
    r = y - A @ beta
    dof = len(y) - A.shape[1]
    s2 = (w * r * r).sum() / dof
    cov = s2 * np.linalg.inv(A.T @ (A * w[:, None]))
    se = np.sqrt(np.diag(cov))
    t = beta / se
    return beta, se, t, 2 * stats.t.sf(np.abs(t), dof), dof, s2


def logistic_reference(X, y, w):
    """The MLE (intercept last) and its Wald statistics from the inverse Fisher
    information."""
    A = np.c_[X, np.ones(len(y))]

    def nll(b):
        z = A @ b
        return float(w @ (np.logaddexp(0, z) - y * z)), A.T @ (w * (1 / (1 + np.exp(-z)) - y))

    res = optimize.minimize(nll, np.zeros(A.shape[1]), jac=True, method="L-BFGS-B",
                            options={"ftol": 0, "gtol": 1e-13, "maxiter": 2000})
    b = res.x
    mu = 1 / (1 + np.exp(-(A @ b)))
    info = A.T @ (A * (w * mu * (1 - mu))[:, None])
    se = np.sqrt(np.diag(np.linalg.inv(info)))
    z = b / se
    return b, se, z, 2 * stats.norm.sf(np.abs(z)), len(y) - A.shape[1]


def through_blocks(X, y, w, beta, kind, chunks=3):
    """The pass's sums over a few blocks at ``beta``, then the driver's statistics."""
    layout = kernels.Layout(X.shape[1], 1, True)
    cuts = np.linspace(0, len(y), chunks + 1).astype(int)
    total = sum(inference.block_sums([(X[a:b], y[a:b], w[a:b])], beta, layout, kind)
                for a, b in zip(cuts[:-1], cuts[1:]))
    names = [f"features[{j}]" for j in range(X.shape[1])]
    return inference.statistics(total, beta[:-1], beta[-1:], kind, True, names)


def test_linear_statistics_are_weighted_least_squares_on_real_data():
    X, y = cancer_arrays()
    w = np.random.default_rng(0).uniform(0.5, 2.0, size=len(y))
    beta, se, t, p, dof, s2 = wls_reference(X, y, w)
    got = through_blocks(X, y, w, beta, "linear")
    np.testing.assert_allclose(got["coefficientStandardErrors"], se, rtol=1e-9)
    np.testing.assert_allclose(got["tValues"], t, rtol=1e-9)
    np.testing.assert_allclose(got["pValues"], p, rtol=1e-8, atol=1e-300)
    assert got["degreesOfFreedom"] == dof == 563
    assert got["dispersion"] == pytest.approx(s2, rel=1e-10)


def test_logistic_statistics_are_wald_from_the_fisher_information():
    X, y, w = logistic_data(n=800, d=4, seed=3, weights=True)
    beta, se, z, p, dof = logistic_reference(X, y, w)
    got = through_blocks(X, y, w, beta, "logistic")
    np.testing.assert_allclose(got["coefficientStandardErrors"], se, rtol=1e-9)
    np.testing.assert_allclose(got["tValues"], z, rtol=1e-9)
    np.testing.assert_allclose(got["pValues"], p, rtol=1e-8, atol=1e-300)
    assert got["dispersion"] == 1.0 and got["degreesOfFreedom"] == dof


def test_collinear_and_constant_columns_are_named():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(200, 4))
    X[:, 2] = 2 * X[:, 0] - X[:, 1]                     # a combination of two others
    y = X @ [1.0, 2.0, 0.0, -1.0] + rng.normal(size=200)
    w = np.ones(200)
    with pytest.raises(SparkgdError, match=r"singular -- collinear \(or constant\) columns: "
                                           r"features\[0\], features\[1\], features\[2\]$"):
        through_blocks(X, y, w, np.r_[1.0, 2.0, 0.0, -1.0, 0.0], "linear")
    X = rng.normal(size=(200, 3))
    X[:, 1] = 5.0                                        # constant: the intercept's twin
    with pytest.raises(SparkgdError, match=r"columns: features\[1\], intercept$"):
        through_blocks(X, y, w, np.zeros(4), "linear")


def test_which_fits_have_statistics():
    assert inference.why_none("squared", 1, 10, 0.0, False) is None
    assert inference.why_none("logistic", 1, 10, 0.0, False) is None
    assert "regParam 0.1" in inference.why_none("squared", 1, 10, 0.1, False)
    assert "at most 1024 features" in inference.why_none("logistic", 1, 1025, 0.0, False)
    assert "not for loss 'huber'" in inference.why_none("huber", 1, 10, 0.0, False)
    assert "3 classes" in inference.why_none("multinomial", 3, 10, 0.0, False)
    assert "private" in inference.why_none("logistic", 1, 10, 0.0, True)


def test_fits_on_spark_carry_the_textbook_statistics(spark, tmp_path):
    """LinearRegression on the real data with weights, LogisticRegression on synthetic
    data: the summary's statistics equal the textbook's at the reference optimum to 1e-4;
    a saved model keeps them; a penalized fit says why it has none."""
    import pandas as pd
    from pyspark.ml.functions import array_to_vector

    X, y = cancer_arrays()
    w = np.random.default_rng(0).uniform(0.5, 2.0, size=len(y))
    df = spark.createDataFrame(pd.DataFrame({"features": list(X), "label": y, "weight": w}))
    df = df.select(array_to_vector("features").alias("features"), "label", "weight")
    model = sparkgd.LinearRegression(weightCol="weight", tol=1e-12, maxIter=500).fit(df)
    _, se, t, p, dof, s2 = wls_reference(X, y, w)
    s = model.summary
    np.testing.assert_allclose(s.coefficientStandardErrors, se, rtol=1e-4)
    np.testing.assert_allclose(s.tValues, t, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(s.pValues, p, rtol=1e-4, atol=1e-6)
    assert s.degreesOfFreedom == dof and s.dispersion == pytest.approx(s2, rel=1e-4)
    model.save(str(tmp_path / "m"))
    loaded = sparkgd.LinearRegressionModel.load(str(tmp_path / "m"))
    np.testing.assert_array_equal(loaded.summary.pValues, s.pValues)
    import json

    saved = json.load(open(tmp_path / "m" / "metadata.json"))["summary"]   # DESIGN.md 4
    for name in ("coefficientStandardErrors", "tValues", "pValues"):
        np.testing.assert_array_equal(saved[name], getattr(s, name))

    Xl, yl, wl = logistic_data(n=800, d=4, seed=3, weights=True)
    dfl = to_df(spark, Xl, yl, wl, partitions=3)
    logit = sparkgd.LogisticRegression(weightCol="weight", tol=1e-12, maxIter=500).fit(dfl)
    _, se, z, p, _ = logistic_reference(Xl, yl, wl)
    np.testing.assert_allclose(logit.summary.coefficientStandardErrors, se, rtol=1e-4)
    np.testing.assert_allclose(logit.summary.tValues, z, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logit.summary.pValues, p, rtol=1e-4, atol=1e-6)

    penalized = sparkgd.LogisticRegression(weightCol="weight", regParam=0.1).fit(dfl)
    with pytest.raises(SparkgdError, match="no pValues: .*unpenalized fit.*regParam 0.1"):
        penalized.summary.pValues
