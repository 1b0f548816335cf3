"""Reference objectives written from DESIGN.md in NumPy, and their optimum by SciPy:
what every fit is checked against (tests/ and tests/connect share them)."""
import numpy as np
from scipy.optimize import minimize as scipy_minimize



def np_smooth(theta, X, y, w, loss, k=1, fit_intercept=True, l2=0.0, eps=1.35):
    """Smooth part of F (loss + l2/2 ||beta||^2) and its gradient, written from DESIGN.md."""
    n, d = X.shape
    B = theta[: k * d].reshape(k, d)
    b = theta[k * d:] if fit_intercept else np.zeros(k)
    Z = X @ B.T + b
    w = np.ones(n) if w is None else w
    z = Z[:, 0]
    if loss == "squared":
        lz, dz = 0.5 * (y - z) ** 2, (z - y)[:, None]
    elif loss == "huber":
        r = y - z
        inside = np.abs(r) <= eps
        lz = np.where(inside, 0.5 * r * r, eps * (np.abs(r) - eps / 2))
        dz = np.where(inside, -r, -eps * np.sign(r))[:, None]
    elif loss == "logistic":
        lz = np.logaddexp(0, z) - y * z
        dz = (1 / (1 + np.exp(-z)) - y)[:, None]
    elif loss == "hinge":
        s = 2 * y - 1
        lz = np.maximum(0, 1 - s * z)
        dz = np.where(1 - s * z > 0, -s, 0.0)[:, None]
    else:  # multinomial
        m = Z.max(axis=1, keepdims=True)
        lse = np.log(np.exp(Z - m).sum(axis=1)) + m[:, 0]
        yi = y.astype(int)
        lz = lse - Z[np.arange(n), yi]
        dz = np.exp(Z - lse[:, None])
        dz[np.arange(n), yi] -= 1
    W = w.sum()
    f = w @ lz / W + 0.5 * l2 * (B * B).sum()
    gB = (w[:, None] * dz).T @ X / W + l2 * B
    g = np.concatenate([gB.ravel(), (w @ dz) / W if fit_intercept else []])
    return f, g


def reference_optimum(X, y, w, loss, k=1, reg=0.0, alpha=0.0, fit_intercept=True):
    """SciPy L-BFGS-B on the split formulation (L1 as a linear term over p, q >= 0)."""
    d = X.shape[1]
    nc, ni = k * d, (k if fit_intercept else 0)
    l1 = reg * alpha
    s = np.r_[np.tile(X.std(axis=0), k), np.ones(ni)]  # solve well scaled

    def fun(v):
        p, q, b = v[:nc], v[nc:2 * nc], v[2 * nc:]
        theta = np.r_[p - q, b] / s
        f, g = np_smooth(theta, X, y, w, loss, k, fit_intercept, reg * (1 - alpha))
        g = g / s
        return (f + l1 * (p + q) @ (1 / s[:nc]),
                np.r_[g[:nc] + l1 / s[:nc], -g[:nc] + l1 / s[:nc], g[nc:]])

    bounds = [(0, None)] * (2 * nc) + [(None, None)] * ni
    res = scipy_minimize(fun, np.zeros(2 * nc + ni), jac=True, method="L-BFGS-B",
                         bounds=bounds, options={"ftol": 1e-16, "gtol": 1e-13,
                                                 "maxiter": 50000, "maxfun": 100000})
    v = res.x
    return np.r_[v[:nc] - v[nc:2 * nc], v[2 * nc:]] / s, res.fun


def model_theta(m):
    return np.r_[np.ravel(m.coefficients), np.ravel(m.intercept)]


def full_objective(theta, X, y, w, loss, k, reg, alpha, fit_intercept=True):
    f, _ = np_smooth(theta, X, y, w, loss, k, fit_intercept, reg * (1 - alpha))
    return f + reg * alpha * np.abs(theta[: k * X.shape[1]]).sum()
