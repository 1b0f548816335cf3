"""Coefficient statistics of an unpenalized fit: standard errors, t (or Wald z) values and
p-values, under Spark ML's ``GeneralizedLinearRegressionTrainingSummary`` names (the
intercept last).

One more pass over the blocks at the returned coefficients sums what they need
(:func:`block_sums`: the weighted cross-product of ``[x, 1]`` with each row's curvature,
the weighted residual sum of squares, the rows); the driver solves the rest
(:func:`statistics`). The formulas are the textbook ones:

* linear regression (squared loss), weighted rows: ``p`` coefficients (the intercept
  counted), ``dof = n - p`` (n rows), ``dispersion = sum(w r^2) / dof``,
  ``cov = dispersion * (X~' W X~)^-1``, ``t = beta / se``, ``p = 2 P(T_dof > |t|)``;
* binomial logistic regression: ``cov = (X~' diag(w mu (1 - mu)) X~)^-1`` (the inverse
  Fisher information), Wald ``z = beta / se``, ``p = 2 P(Z > |z|)``, dispersion 1.

Only for unpenalized fits (the penalty changes the estimator: these formulas do not
hold), at most :data:`MAX_FEATURES` features (the pass sums a (d+1)^2 matrix), and a
Hessian of full rank -- otherwise a :class:`~sparkgd.errors.SparkgdError` that says why,
naming the collinear columns (those with weight in a null vector of the Hessian).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .errors import SparkgdError

#: The most features coefficient statistics are computed for: the pass adds up a
#: (d+1) x (d+1) float64 matrix a task (8 MB at 1024), and the driver inverts it.
MAX_FEATURES = 1024

#: Losses (and so models) the statistics are defined for here.
KINDS = {"squared": "linear", "logistic": "logistic"}


def why_none(loss_name, k, d, reg_param, private, width_touched=None):
    """Why a fit gets no coefficient statistics (a sentence), or None when it does."""
    if private:
        return "a private fit computes no coefficient statistics (they are not noised)"
    if loss_name not in KINDS or k != 1:
        return (f"coefficient statistics are computed for linear regression (squared loss) "
                f"and binomial logistic regression, not for loss {loss_name!r}"
                + ("" if k == 1 else f" with {k} classes"))
    if reg_param != 0:
        return (f"coefficient statistics need an unpenalized fit (regParam 0); this one has "
                f"regParam {reg_param:g}, under which the formulas do not hold")
    if d > MAX_FEATURES:
        return (f"coefficient statistics are computed for at most {MAX_FEATURES} features "
                f"(a ({MAX_FEATURES}+1)^2 matrix a pass); this fit has {d}")
    if width_touched is not None:
        return width_touched
    return None


def vector_size(p):
    """Floats a task sends: [rows, sum w, sum w r^2, H (p x p)]."""
    return 3 + p * p


def block_sums(blocks, theta, layout, kind):
    """One task's ``[rows, sum w, sum w r^2, H...]`` at ``theta``: ``H`` the weighted
    cross-product ``X~' diag(w c) X~`` with ``X~ = [X, 1]`` (without the ones column when
    the fit has no intercept) and ``c = 1`` (linear) or ``mu (1 - mu)`` (logistic)."""
    from . import kernels

    d = layout.d
    p = d + (1 if layout.fit_intercept else 0)
    coef, intercept = layout.split(np.asarray(theta, dtype=np.float64))
    out = np.zeros(vector_size(p))
    H = np.zeros((p, p))
    for X, y, w in blocks:
        for Xc, yc, wc in kernels.row_chunks(X, y, w):
            n = yc.shape[0]
            if n == 0:
                continue
            Xc = kernels.as_float64(Xc, d)
            z = kernels.margins(Xc, coef, intercept)[:, 0]
            wv = np.ones(n) if wc is None else wc
            if kind == "linear":
                r = z - yc
                out[2] += float((wv * r) @ r)
                c = wv
            else:
                mu = 1.0 / (1.0 + np.exp(-z))
                c = wv * mu * (1.0 - mu)
            if sp.issparse(Xc):
                cross = (Xc.T @ sp.diags(c) @ Xc).toarray()
                colsum = np.asarray(Xc.T @ c).ravel()
            else:
                cross = (Xc.T * c) @ Xc
                colsum = c @ Xc
            H[:d, :d] += cross
            if layout.fit_intercept:
                H[:d, d] += colsum
                H[d, :d] += colsum
                H[d, d] += c.sum()
            out[0] += n
            out[1] += wv.sum()
    out[3:] = H.ravel()
    return out


def statistics(total, coef, intercept, kind, fit_intercept, names):
    """``{coefficientStandardErrors, tValues, pValues, degreesOfFreedom, dispersion}``
    from the summed pass (:func:`block_sums`' layout), the intercept last; raises
    SparkgdError for a singular Hessian, naming its collinear columns."""
    from scipy import stats

    beta = np.r_[np.asarray(coef, dtype=np.float64).ravel(),
                 np.atleast_1d(intercept).astype(np.float64)[:1] if fit_intercept else []]
    p = beta.size
    n, _, rss = float(total[0]), float(total[1]), float(total[2])
    H = np.asarray(total[3:3 + p * p], dtype=np.float64).reshape(p, p)
    H = 0.5 * (H + H.T)
    dof = int(n) - p
    if dof <= 0:
        raise SparkgdError(f"coefficient statistics need more rows than coefficients "
                           f"({int(n)} rows, {p} coefficients)")
    dependent = collinear(H)
    if dependent:
        labels = [names[j] if j < len(names) else "intercept" for j in dependent]
        raise SparkgdError("coefficient statistics: the Hessian is singular -- collinear "
                           "(or constant) columns: " + ", ".join(labels[:10]) +
                           (f" and {len(labels) - 10} more" if len(labels) > 10 else ""))
    inv = np.linalg.inv(H)
    if kind == "linear":
        dispersion = rss / dof
        cov = dispersion * inv
    else:
        dispersion = 1.0
        cov = inv
    se = np.sqrt(np.maximum(np.diag(cov), 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        t = beta / se           # a perfect linear fit: se 0, t infinite (as Spark ML's)
    if kind == "linear":
        pv = 2.0 * stats.t.sf(np.abs(t), dof)
    else:
        pv = 2.0 * stats.norm.sf(np.abs(t))
    return {"coefficientStandardErrors": se.tolist(), "tValues": t.tolist(),
            "pValues": pv.tolist(), "degreesOfFreedom": dof, "dispersion": float(dispersion)}


def collinear(H, rtol=None):
    """Columns of the symmetric positive semi-definite ``H`` that take part in a linear
    dependence (every column with weight in a null vector of ``H`` scaled to a unit
    diagonal, so units do not matter), sorted; [] at full rank."""
    p = H.shape[0]
    if p == 0:
        return []
    scale = np.sqrt(np.maximum(np.diag(H), 0.0))
    zero = scale == 0
    scale[zero] = 1.0
    Hs = H / scale[:, None] / scale[None, :]
    vals, vecs = np.linalg.eigh(Hs)
    tol = (rtol if rtol is not None else p * np.finfo(float).eps * 1e4) * max(vals[-1], 1e-300)
    null = vecs[:, vals <= tol]
    found = set(np.flatnonzero(zero).tolist())
    for v in null.T:
        found |= set(np.flatnonzero(np.abs(v) > 1e-3 * np.abs(v).max()).tolist())
    return sorted(int(j) for j in found)
