"""Feature moments over the cached blocks: weighted mean and standard deviation.

Used to precondition the optimizers (a diagonal change of variables that leaves
the objective as it is) and, with ``standardization=True``, to define the
scaled space the penalty applies in. The variance is Spark ML's: weighted and
unbiased, ``sum_i w_i (x_ij - mean_j)^2 / (W - sum_i w_i^2 / W)``.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def block_moments(X, w, d):
    """``[W, sum w^2, sum_i w_i x_i (d), sum_i w_i x_i^2 (d)]`` for one block."""
    out = np.zeros(2 + 2 * d)
    n = X.shape[0]
    if n == 0:
        return out
    if w is None:
        w = np.ones(n)
    out[0] = w.sum()
    out[1] = w @ w
    if sp.issparse(X):
        out[2:2 + d] = X.T @ w
        out[2 + d:] = X.multiply(X).T @ w
    else:
        out[2:2 + d] = w @ X
        out[2 + d:] = np.einsum("ij,ij,i->j", X, X, w, optimize=False)
    return out


def moments_from_sums(total, d):
    """(mean, std) from summed :func:`block_moments`."""
    W, W2 = total[0], total[1]
    s1, s2 = total[2:2 + d], total[2 + d:]
    mean = s1 / W
    m2 = s2 - W * mean * mean
    # A constant column leaves only rounding noise here: call it exactly 0.
    m2[m2 <= 1e-10 * s2] = 0.0
    denom = W - W2 / W
    var = m2 / denom if denom > 0 else np.zeros(d)
    return mean, np.sqrt(var)


def _moments_task(blocks, d):
    total = np.zeros(2 + 2 * d)
    for X, _y, w in blocks:
        total += block_moments(X, w, d)
    yield total


def feature_moments(blocks, d, aggregator):
    """Distributed (mean, std) of every feature over :class:`~sparkgd.data.Blocks`."""
    total = blocks.run(
        lambda rdd: aggregator.sum(rdd.mapPartitions(lambda it: _moments_task(it, d)),
                                   2 + 2 * d))
    return moments_from_sums(total, d)


class Preconditioner:
    """A linear change of variables ``theta = T u`` that leaves the objective alone.

    In ``u`` every feature looks centred and unit-variance: ``beta = u_beta / std``
    and, with an intercept, ``b = u_b - sum_j mean_j beta_j`` (per class). The
    loss then sees ``z = sum_j (x_j - mean_j)/std_j u_j + u_b``, which is what
    makes line-search methods converge on features in different units. Nothing
    touches the data: only the driver maps vectors. Constant features keep
    ``constant_scale`` (1; 0 pins their coefficient at 0, as Spark ML does when
    standardizing) and no shift. ``center=False`` gives the plain diagonal scaling
    ``u = beta * std`` -- the standardized space of ``standardization=True``.
    """

    def __init__(self, mean, std, layout, center=True, constant_scale=1.0):
        ok = std > 0
        self.layout = layout
        self.inv_std = np.where(ok, 1.0 / np.where(ok, std, 1.0), constant_scale)
        use_shift = center and layout.fit_intercept
        self.shift = np.where(ok, mean, 0.0) if use_shift else np.zeros_like(mean)

    def l1_to_u(self, l1):
        """L1 weights on theta -> on u (``|beta_j| = inv_std_j |u_j|``)."""
        out = np.array(l1, dtype=np.float64)
        n = self.layout.n_coef
        out[:n] = out[:n] * np.tile(self.inv_std, self.layout.k)
        return out

    def _split(self, v):
        k, d = self.layout.k, self.layout.d
        coef = v[: k * d].reshape(k, d)
        icpt = v[k * d:] if self.layout.fit_intercept else None
        return coef, icpt

    def to_theta(self, u):
        cu, bu = self._split(u)
        beta = cu * self.inv_std
        parts = [beta.ravel()]
        if bu is not None:
            parts.append(bu - beta @ self.shift)
        return np.concatenate(parts)

    def from_theta(self, theta):
        beta, b = self._split(theta)
        pinned = self.inv_std == 0
        parts = [np.where(pinned, 0.0, beta / np.where(pinned, 1.0, self.inv_std)).ravel()]
        if b is not None:
            parts.append(b + beta @ self.shift)
        return np.concatenate(parts)

    def grad_to_u(self, g):
        """The gradient in ``u``: ``T^T g``."""
        gb, gi = self._split(g)
        if gi is not None:
            gb = gb - np.outer(gi, self.shift)
        parts = [(gb * self.inv_std).ravel()]
        if gi is not None:
            parts.append(gi)
        return np.concatenate(parts)
