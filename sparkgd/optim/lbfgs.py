"""L-BFGS: SciPy's L-BFGS-B driven by the distributed ``fun(theta) -> (F, grad)``.

SciPy's ``ftol`` test, ``(F_k - F_{k+1}) / max(|F_k|, |F_{k+1}|, 1) <= ftol``, is
exactly sparkgd's ``tol``; the projected-gradient test is switched off so the
objective alone decides, as the contract says.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize as _scipy_minimize

from . import OptimResult

#: Correction pairs kept, as Spark ML's LogisticRegression / LinearRegression.
HISTORY_SIZE = 10


def minimize_lbfgs(fun, x0, max_iter=100, tol=1e-6, callback=None, bounds=None):
    """Run L-BFGS-B; ``bounds`` is passed to SciPy (used by the L1 split)."""
    last = {}

    def wrapped(x):
        f, g = fun(x)
        last["x"], last["f"], last["g"] = x.copy(), float(f), g
        return f, g

    history = []
    prev = {"x": np.asarray(x0, dtype=np.float64).copy()}

    def on_iteration(intermediate_result):
        x = intermediate_result.x
        f = float(intermediate_result.fun)
        history.append(f)
        if callback is not None:
            g = last["g"] if "x" in last and np.array_equal(last["x"], x) else None
            gnorm = float(np.linalg.norm(g)) if g is not None else float("nan")
            callback(len(history), f, gnorm, float(np.linalg.norm(x - prev["x"])))
        prev["x"] = x.copy()

    if max_iter <= 0:
        f, _ = wrapped(np.asarray(x0, dtype=np.float64))
        return OptimResult(np.asarray(x0, dtype=np.float64).copy(), f, [f], 0, False,
                           "maxIter is 0")
    res = _scipy_minimize(
        wrapped, np.asarray(x0, dtype=np.float64), jac=True, method="L-BFGS-B",
        bounds=bounds, callback=on_iteration,
        options={"maxiter": int(max_iter), "ftol": float(tol), "gtol": 0.0,
                 "maxfun": max(15000, 20 * int(max_iter)), "maxcor": HISTORY_SIZE,
                 "maxls": 40},
    )
    f = float(res.fun)
    if not history or history[-1] != f:
        history.append(f)
    message = res.message if isinstance(res.message, str) else str(res.message)
    return OptimResult(np.asarray(res.x, dtype=np.float64), f, history, int(res.nit),
                       bool(res.success) and "ITERATIONS" not in message.upper(), message)
