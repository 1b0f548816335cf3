"""Full-batch gradient descent.

* ``step_size`` given: the fixed step ``x_{k+1} = x_k - step_size * g_k``.
* otherwise: Armijo backtracking, halving ``t`` until
  ``F(x - t g) <= F_ref - c t ||g||^2``. The first trial step of each iteration
  is the Barzilai-Borwein step ``s.s / s.y`` from the last two iterates (the
  previous accepted step doubled when that is not positive). The reference is
  non-monotone (Grippo-Lampariello-Lucidi): ``F_ref`` is the largest of the last
  ``MEMORY`` objectives, so a good long BB step is not thrown away for a small
  rise; that is what makes BB fast, and it still converges.

Every evaluation of ``fun`` is one distributed pass; a trial that is accepted
also supplies the next gradient, so an accepted first trial costs one pass.
"""
from __future__ import annotations

import numpy as np

from . import OptimResult, converged

ARMIJO_C = 1e-4
MAX_HALVINGS = 60
MEMORY = 10


def minimize_gd(fun, x0, max_iter=100, tol=1e-6, step_size=None, callback=None):
    x = np.asarray(x0, dtype=np.float64).copy()
    f, g = fun(x)
    history = []
    t = 1.0
    s = yv = None
    message = "maxIter reached"
    done = False
    it = 0
    for it in range(1, int(max_iter) + 1):
        if step_size is not None:
            t = float(step_size)
            x_new = x - t * g
            f_new, g_new = fun(x_new)
        else:
            if s is not None:
                sy = float(s @ yv)
                t = float(s @ s) / sy if sy > 0 else 2.0 * t
            gg = float(g @ g)
            f_ref = max([f] + history[-MEMORY:])
            if gg == 0.0:
                history.append(f)
                message, done = "gradient is zero", True
                break
            for _ in range(MAX_HALVINGS):
                x_new = x - t * g
                f_new, g_new = fun(x_new)
                if f_new <= f_ref - ARMIJO_C * t * gg:
                    break
                t *= 0.5
            else:
                history.append(f)
                message = "line search found no decrease (objective at machine precision)"
                done = True
                break
        s, yv = x_new - x, g_new - g
        f_prev = f
        x, f, g = x_new, float(f_new), g_new
        history.append(f)
        if callback is not None:
            callback(it, f, float(np.linalg.norm(g)), float(np.linalg.norm(s)))
        if not np.isfinite(f):
            message = "objective is not finite (step size too large?)"
            break
        if converged(f_prev, f, tol):
            message, done = "relative change of the objective <= tol", True
            break
    if not history:
        history.append(float(f))
    return OptimResult(x, float(f), history, it if history else 0, done, message)
