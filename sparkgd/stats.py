"""Feature moments (weighted mean and standard deviation) and the preconditioner. NumPy only.

Used to precondition the optimizers (a diagonal change of variables that leaves
the objective as it is) and, with ``standardization=True``, to define the
scaled space the penalty applies in. The variance is Spark ML's: weighted and
unbiased, ``sum_i w_i (x_ij - mean_j)^2 / (W - sum_i w_i^2 / W)``, computed
from centred per-block moments so a large mean does not swamp a small spread.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .kernels import row_chunks


#: A feature whose standard deviation is below this fraction of its mean's
#: magnitude is constant up to rounding (a timestamp column, std 1e4 around
#: 1.7e9, is 6e-6: far above it).
CONSTANT_RELATIVE_STD = 1e-10


def block_moments(X, w, d):
    """``[W, sum w^2, mean (d), M2 (d)]`` of one block, M2 = sum_i w_i (x_i - mean)^2.

    Dense blocks are centred exactly (in row chunks, so no block-sized copy);
    CSR blocks use ``sum w x^2 - W mean^2`` over their non-zeros.
    """
    out = np.zeros(2 + 2 * d)
    n = X.shape[0]
    if n == 0:
        return out
    if X.shape[1] < d:   # a LIBSVM block narrower than the data: its extra columns are 0
        return pad_moments(block_moments(X, w, X.shape[1]), d)
    if w is None:
        w = np.ones(n)
    W = float(w.sum())
    out[0], out[1] = W, float(w @ w)
    if W <= 0:
        return out
    if sp.issparse(X):
        mean = (X.T @ w) / W
        m2 = X.multiply(X).T @ w - W * mean * mean
    else:
        # the kernel's row chunks for both sums: a float32 block is widened a chunk at
        # a time, and no block-sized centred copy is made
        chunks = row_chunks(X, w, w)
        total = np.zeros(d)
        for Xc, wc, _ in chunks:
            total += wc @ Xc
        mean = total / W
        m2 = np.zeros(d)
        for Xc, wc, _ in chunks:
            diff = Xc - mean
            m2 += np.einsum("ij,ij,i->j", diff, diff, wc, optimize=False)
    out[2:2 + d] = mean
    out[2 + d:] = np.maximum(m2, 0.0)
    return out


def pad_moments(m, d):
    """:func:`block_moments` of a block as if it had ``d`` columns, the extra ones zero
    in all its rows (mean 0, M2 0)."""
    k = (m.shape[0] - 2) // 2
    if k == d:
        return m
    out = np.zeros(2 + 2 * d)
    out[:2 + k] = m[:2 + k]
    out[2 + d:2 + d + k] = m[2 + k:]
    return out


def merge_moments(a, b):
    """Combine two :func:`block_moments` results (Chan et al.'s parallel update); the
    narrower of two is padded (:func:`pad_moments`)."""
    d = max(a.shape[0] - 2, b.shape[0] - 2) // 2
    a, b = pad_moments(np.asarray(a, dtype=np.float64), d), \
        pad_moments(np.asarray(b, dtype=np.float64), d)
    Wa, Wb = a[0], b[0]
    if Wa <= 0:
        return b.copy()
    if Wb <= 0:
        return a.copy()
    W = Wa + Wb
    ma, mb = a[2:2 + d], b[2:2 + d]
    delta = mb - ma
    out = np.empty_like(a)
    out[0], out[1] = W, a[1] + b[1]
    out[2:2 + d] = ma + delta * (Wb / W)
    out[2 + d:] = a[2 + d:] + b[2 + d:] + delta * delta * (Wa * Wb / W)
    return out


def moments_from_merged(total, d):
    """(mean, std) from merged :func:`block_moments`: Spark ML's weighted unbiased std;
    exactly 0 for a constant feature."""
    W, W2 = total[0], total[1]
    mean, m2 = total[2:2 + d], total[2 + d:]
    denom = W - W2 / W if W > 0 else 0.0
    var = m2 / denom if denom > 0 else np.zeros(d)
    std = np.sqrt(np.maximum(var, 0.0))
    std[std <= CONSTANT_RELATIVE_STD * np.abs(mean)] = 0.0
    return mean.copy(), std


def moments_from_parts(parts, d):
    """(mean, std) of every feature from per-block or per-task :func:`block_moments`
    (any widths up to ``d``), merged in order."""
    total = np.zeros(2 + 2 * d)
    for part in parts:
        total = merge_moments(total, part)
    return moments_from_merged(pad_moments(total, d), d)


class Preconditioner:
    """A linear change of variables ``theta = T u`` that leaves the objective alone.

    ``beta_j = u_j / s_j`` and, with an intercept (and ``center``),
    ``b = u_b - sum_j mean_j beta_j`` (per class): the loss then sees
    ``z = sum_j s_j^-1 (x_j - mean_j) u_j + u_b``. Nothing touches the data: only the
    driver maps vectors.

    The scale is chosen so that every coordinate of ``u`` has about the same
    curvature, which is what line-search methods (L-BFGS, gradient descent with
    Barzilai-Borwein steps) need. Coordinate j of F's Hessian is about
    ``c var_j + l2_j``: the loss's (``c``, its typical second derivative,
    :attr:`sparkgd.kernels.Loss.curvature`, times the feature's variance) plus the
    L2 penalty's. Hence ``s_j = sqrt(var_j + l2_j / c)``, which makes it about ``c``
    for every feature, as for the intercept. Without a penalty this is the
    standard deviation (every feature looks standardized); with one, a feature
    whose variance is tiny next to ``l2_j / c`` -- most columns of sparse,
    high-dimensional data, where a feature appears in a handful of rows -- is scaled
    by the penalty instead. Scaling by the standard deviation alone (``l2=None``)
    gives such a feature a curvature ``l2_j / var_j`` thousands of times the others',
    and L-BFGS crawls (Spark ML's internal standardization does just that).

    Constant features keep ``constant_scale`` (1; 0 pins their coefficient at 0, as
    Spark ML does when standardizing) and no shift. ``center=False`` gives the plain
    diagonal scaling ``u = beta * s`` -- with ``l2=None``, the standardized space of
    ``standardization=True``, where fixed-step methods take the step the user chose.
    """

    def __init__(self, mean, std, layout, center=True, constant_scale=1.0, l2=None,
                 curvature=1.0):
        ok = std > 0
        self.layout = layout
        scale = std if l2 is None else np.sqrt(std * std + np.asarray(l2) / float(curvature))
        self.inv_scale = np.where(ok, 1.0 / np.where(ok, scale, 1.0), constant_scale)
        use_shift = center and layout.fit_intercept
        self.shift = np.where(ok, mean, 0.0) if use_shift else np.zeros_like(mean)

    def l1_to_u(self, l1):
        """L1 weights on theta -> on u (``|beta_j| = inv_scale_j |u_j|``)."""
        out = np.array(l1, dtype=np.float64)
        n = self.layout.n_coef
        out[:n] = out[:n] * np.tile(self.inv_scale, self.layout.k)
        return out

    def _split(self, v):
        k, d = self.layout.k, self.layout.d
        coef = v[: k * d].reshape(k, d)
        icpt = v[k * d:] if self.layout.fit_intercept else None
        return coef, icpt

    def to_theta(self, u):
        cu, bu = self._split(u)
        beta = cu * self.inv_scale
        parts = [beta.ravel()]
        if bu is not None:
            parts.append(bu - beta @ self.shift)
        return np.concatenate(parts)

    def from_theta(self, theta):
        beta, b = self._split(theta)
        pinned = self.inv_scale == 0
        parts = [np.where(pinned, 0.0, beta / np.where(pinned, 1.0, self.inv_scale)).ravel()]
        if b is not None:
            parts.append(b + beta @ self.shift)
        return np.concatenate(parts)

    def grad_to_u(self, g):
        """The gradient in ``u``: ``T^T g``."""
        gb, gi = self._split(g)
        if gi is not None:
            gb = gb - np.outer(gi, self.shift)
        parts = [(gb * self.inv_scale).ravel()]
        if gi is not None:
            parts.append(gi)
        return np.concatenate(parts)


# --------------------------------------------------------------- the columns rows touch
#
# Sparse, wide data (hashed features: 2^24 columns, a few thousand touched per task)
# is fitted in the space of the columns its rows touch: a task reports its own
# (:func:`local_columns`) with their moments (:func:`column_moments`), the coordinator
# merges them into one sorted list and tells each task where its columns sit in it
# (:func:`spread_moments` puts a task's moments there). Nothing the width of the
# hashed space is ever made.


def distinct(values):
    """The distinct values of an int array, sorted, as int64 (a sort and one comparison:
    NumPy's own ``unique`` takes 60 times as long on a million of them here)."""
    out = np.sort(np.asarray(values, dtype=np.int64), kind="stable")
    if out.size < 2:
        return out
    keep = np.empty(out.size, dtype=bool)
    keep[0] = True
    np.not_equal(out[1:], out[:-1], out=keep[1:])
    return out[keep]


def local_columns(blocks):
    """The sorted columns the CSR ``blocks``' rows touch (int64), or None when a block
    is dense (every column then counts)."""
    parts = []
    for X, _y, _w in blocks:
        if not sp.issparse(X):
            return None
        parts.append(X.indices)
    if not parts:
        return np.zeros(0, dtype=np.int64)
    width = max(X.shape[1] for X, _y, _w in blocks)
    if table_pays(width, sum(p.size for p in parts)):
        seen = np.zeros(width, dtype=bool)       # a scatter: O(width + non-zeros)
        for p in parts:
            seen[p] = True
        return np.flatnonzero(seen).astype(np.int64)
    return distinct(np.concatenate(parts))


def table_pays(width, nnz):
    """Whether a table as wide as the data's space (a byte or four a column) is the
    quicker way over ``nnz`` indices -- a scatter or a gather instead of a sort or a
    binary search -- and small enough: up to 2^22 columns, or 4 a non-zero."""
    return width <= max(1 << 22, 4 * nnz)


def column_moments(blocks, m):
    """:func:`block_moments` of the rows of CSR ``blocks`` whose columns were made their
    own ``m`` (:func:`sparkgd.data.arrow.localize`: every column they touch, in order;
    every other column is 0 in these rows): ``[W, sum w^2, mean (m), M2 (m)]``, summed by
    column without a vector as wide as the data's space."""
    s1, s2 = np.zeros(m), np.zeros(m)
    W = W2 = 0.0
    for X, _y, w in blocks:
        n = X.shape[0]
        if n == 0:
            continue
        w = np.ones(n) if w is None else np.asarray(w, dtype=np.float64)
        W, W2 = W + float(w.sum()), W2 + float(w @ w)
        at = X.indices
        wx = X.data * np.repeat(w, np.diff(X.indptr))
        s1 += np.bincount(at, weights=wx, minlength=m)
        s2 += np.bincount(at, weights=wx * X.data, minlength=m)
    out = np.zeros(2 + 2 * m)
    out[0], out[1] = W, W2
    if W > 0:
        mean = s1 / W
        out[2:2 + m] = mean
        out[2 + m:] = np.maximum(s2 - W * mean * mean, 0.0)
    return out


def spread_moments(local, positions, m):
    """A task's :func:`column_moments` (at its own columns) as moments at the ``m``
    columns of the merged list, its columns at ``positions`` (the others: mean 0, M2 0,
    as they are in its rows)."""
    k = positions.shape[0]
    out = np.zeros(2 + 2 * m)
    out[:2] = local[:2]
    out[2 + positions] = local[2:2 + k]
    out[2 + m + positions] = local[2 + k:]
    return out
