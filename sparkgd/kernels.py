"""Per-partition kernels: pointwise losses and the one linear lift they share.

A loss only knows its raw prediction ``z``: ``loss(y, z)`` and ``d loss / d z``,
row by row. The lift turns that into coefficients:

    z      = X @ coef.T + intercept          (n, K)   K = 1 for every loss but multinomial
    g_coef = X.T @ (w * dz)                  (d, K)
    g_int  = sum_i w_i * dz_i                (K,)

Everything a kernel returns is a *sum* over rows (loss, gradient, weight), never
a mean, so any order of aggregation gives the same total up to rounding; the
driver divides by W = sum_i w_i once.

The parameters travel as one flat float64 vector ``theta`` laid out as
``[coef.ravel() (K*d), intercept (K, only when fitIntercept)]`` -- see
:class:`Layout`. A partial result is one flat vector too:
``[loss_sum, weight_sum, grad (len(theta))]``, so aggregation is plain ``+``.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

# ----------------------------------------------------------------------------
# Pointwise losses. Each states its formula; ``z`` has shape (n, K).
# ----------------------------------------------------------------------------

LOSSES = {}


def _register(cls):
    LOSSES[cls.name] = cls
    return cls


class Loss:
    """``loss(y, z)`` summed with weights; ``derivative`` is d loss / d z."""

    name = None
    #: "real" labels, "binary" {0, 1}, or "class" {0, ..., K-1}
    labels = "real"

    def n_outputs(self, num_classes):
        return 1

    def value_and_derivative(self, y, z):
        """Return (loss per row, shape (n,); d loss/d z, shape of z)."""
        raise NotImplementedError

    def params(self):
        return {}


@_register
class SquaredLoss(Loss):
    """``0.5 * (y - z)^2``; derivative ``z - y``."""

    name = "squared"

    def value_and_derivative(self, y, z):
        r = z[:, 0] - y
        return 0.5 * r * r, r[:, None]


@_register
class LogisticLoss(Loss):
    """``log(1 + e^z) - y z`` for y in {0, 1}; derivative ``sigmoid(z) - y``.

    Computed as ``logaddexp(0, z) - y z`` so large |z| neither overflows nor
    loses the small tail.
    """

    name = "logistic"
    labels = "binary"

    def value_and_derivative(self, y, z):
        z = z[:, 0]
        value = np.logaddexp(0.0, z) - y * z
        return value, (_sigmoid(z) - y)[:, None]


def _sigmoid(z):
    # exp of a non-positive number only: no overflow, full precision in both tails.
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def make_loss(name, **params):
    try:
        cls = LOSSES[name]
    except KeyError:
        raise ValueError(
            f"unknown loss {name!r}; expected one of {', '.join(sorted(LOSSES))}"
        ) from None
    return cls(**params)


# ----------------------------------------------------------------------------
# The parameter layout and the linear lift.
# ----------------------------------------------------------------------------


class Layout:
    """Where coefficients and intercepts sit in the flat vector ``theta``."""

    def __init__(self, num_features, num_outputs=1, fit_intercept=True):
        self.d = int(num_features)
        self.k = int(num_outputs)
        self.fit_intercept = bool(fit_intercept)
        self.n_coef = self.d * self.k
        self.size = self.n_coef + (self.k if self.fit_intercept else 0)

    def split(self, theta):
        """-> (coef (K, d) view, intercept (K,) array)."""
        coef = theta[: self.n_coef].reshape(self.k, self.d)
        if self.fit_intercept:
            intercept = theta[self.n_coef :]
        else:
            intercept = np.zeros(self.k)
        return coef, intercept

    def join(self, coef, intercept):
        coef = np.asarray(coef, dtype=np.float64).reshape(self.k, self.d)
        parts = [coef.ravel()]
        if self.fit_intercept:
            parts.append(np.asarray(intercept, dtype=np.float64).reshape(self.k))
        return np.concatenate(parts)

    def zeros(self):
        return np.zeros(self.size)

    def to_tuple(self):
        return (self.d, self.k, self.fit_intercept)


def margins(X, coef, intercept):
    """z = X @ coef.T + intercept, shape (n, K); X dense or CSR."""
    z = X @ coef.T
    if sp.issparse(z):  # pragma: no cover - scipy returns dense for sparse @ dense
        z = z.toarray()
    z = np.asarray(z)
    z += intercept
    return z


def block_sums(X, y, w, theta, loss, layout):
    """One block's partial result ``[loss_sum, weight_sum, grad...]``.

    ``w`` may be None (all weights 1).
    """
    out = np.zeros(2 + layout.size)
    n = y.shape[0]
    if n == 0:
        return out
    coef, intercept = layout.split(theta)
    z = margins(X, coef, intercept)
    value, dz = loss.value_and_derivative(y, z)
    if w is None:
        out[0] = value.sum()
        out[1] = n
        wdz = dz
    else:
        out[0] = value @ w
        out[1] = w.sum()
        wdz = dz * w[:, None]
    grad = out[2:]
    # (K, d): each row is X.T @ wdz[:, k]; X.T @ wdz is (d, K).
    gc = X.T @ wdz
    grad[: layout.n_coef] = np.asarray(gc).T.ravel()
    if layout.fit_intercept:
        grad[layout.n_coef :] = wdz.sum(axis=0)
    return out


def partition_sums(blocks, theta, loss, layout):
    """Sum of :func:`block_sums` over an iterable of (X, y, w) blocks."""
    total = np.zeros(2 + layout.size)
    for X, y, w in blocks:
        total += block_sums(X, y, w, theta, loss, layout)
    return total
