"""L-BFGS: SciPy's L-BFGS-B driven by the distributed ``fun(x) -> (F, grad)``.

SciPy's ``ftol`` test, ``(F_k - F_{k+1}) / max(|F_k|, |F_{k+1}|, 1) <= ftol``, is
exactly sparkgd's ``tol``; the projected-gradient test is switched off so the
objective alone decides, as the contract says.

With an L1 term, the coordinates that carry one are split, ``x_j = p_j - q_j``
with ``p_j, q_j >= 0``, and the problem becomes the smooth, bound-constrained

    min fun(p - q, rest) + sum_j l1_j (p_j + q_j)

whose bounds L-BFGS-B handles exactly: a coefficient that is zero at the
optimum ends with both halves on their bound, i.e. exactly 0.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize as _scipy_minimize

from .base import OptimResult, l1_value

#: Correction pairs kept, as Spark ML's LogisticRegression / LinearRegression.
HISTORY_SIZE = 10


class _Split:
    """``x <-> z = [x_free, p, q]`` for the coordinates with an L1 weight."""

    def __init__(self, l1):
        self.n = l1.shape[0]
        self.pen = np.flatnonzero(l1 > 0)
        self.free = np.flatnonzero(l1 <= 0)
        self.w = l1[self.pen]
        m = self.pen.shape[0]
        self.bounds = [(None, None)] * self.free.shape[0] + [(0.0, None)] * (2 * m)

    def to_z(self, x):
        xp = x[self.pen]
        return np.concatenate([x[self.free], np.maximum(xp, 0.0), np.maximum(-xp, 0.0)])

    def to_x(self, z):
        nf, m = self.free.shape[0], self.pen.shape[0]
        x = np.empty(self.n)
        x[self.free] = z[:nf]
        x[self.pen] = z[nf:nf + m] - z[nf + m:]
        return x

    def wrap(self, fun):
        nf, m = self.free.shape[0], self.pen.shape[0]

        def fz(z):
            f, g = fun(self.to_x(z))
            pq = z[nf:]
            gp = g[self.pen]
            gz = np.concatenate([g[self.free], gp + self.w, -gp + self.w])
            return f + float(self.w @ (pq[:m] + pq[m:])), gz

        return fz


def minimize_lbfgs(fun, x0, max_iter=100, tol=1e-6, l1=None, callback=None):
    x0 = np.asarray(x0, dtype=np.float64)
    split = _Split(l1) if l1 is not None else None
    fz = split.wrap(fun) if split else fun
    z0 = split.to_z(x0) if split else x0.copy()
    to_x = split.to_x if split else (lambda z: z)

    last = {}

    def evaluated(z):
        f, g = fz(z)
        last["z"], last["g"] = z.copy(), g
        return f, g

    history = []
    prev = {"x": x0.copy()}

    def on_iteration(intermediate_result):
        z = intermediate_result.x
        f = float(intermediate_result.fun)
        history.append(f)
        if callback is not None:
            g = last["g"] if "z" in last and np.array_equal(last["z"], z) else None
            gnorm = float(np.linalg.norm(g)) if g is not None else float("nan")
            x = np.array(to_x(z), copy=True)  # SciPy reuses its array between calls
            callback(len(history), f, gnorm, float(np.linalg.norm(x - prev["x"])))
            prev["x"] = x

    if max_iter <= 0:
        f, _ = fun(x0)
        f += l1_value(l1, x0)
        return OptimResult(x0.copy(), f, [f], 0, False, "maxIter is 0")
    res = _scipy_minimize(
        evaluated, z0, jac=True, method="L-BFGS-B",
        bounds=split.bounds if split else None, callback=on_iteration,
        options={"maxiter": int(max_iter), "ftol": float(tol), "gtol": 0.0,
                 "maxfun": max(15000, 20 * int(max_iter)), "maxcor": HISTORY_SIZE,
                 "maxls": 40},
    )
    f = float(res.fun)
    x = to_x(np.asarray(res.x, dtype=np.float64))
    if split is not None and not np.array_equal(split.to_z(x), res.x):
        # Both halves of a coefficient left positive: the split value overstates F(x).
        f = float(fun(x)[0]) + l1_value(l1, x)
        if history:
            history[-1] = f
    if not history or history[-1] != f:
        history.append(f)
    message = res.message if isinstance(res.message, str) else str(res.message)
    return OptimResult(x, f, history, int(res.nit),
                       bool(res.success) and "ITERATIONS" not in message.upper(), message)
