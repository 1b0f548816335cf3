"""Full-batch (proximal) gradient descent.

* ``step_size`` given: the fixed step ``x_{k+1} = prox(x_k - step_size * g_k)``.
* otherwise: backtracking, halving ``t`` until the sufficient-decrease test
  holds: ``F(x+) <= F_ref - c t ||g||^2`` without L1 (Armijo), and
  ``F(x+) <= F_ref - c/(2t) ||x+ - x||^2`` with it (SpaRSA). The first trial step of each iteration is the Barzilai-Borwein step
  ``s.s / s.y`` from the last two iterates (the previous accepted step doubled
  when that is not positive). The reference is non-monotone
  (Grippo-Lampariello-Lucidi): the largest of the last ``MEMORY`` objectives,
  so a good long BB step is not thrown away for a small rise; that is what makes
  BB fast, and it still converges.

With compressed gradients (``inexact``; F stays exact) a step along the gradient
need not go downhill, and the difference of two gradients is mostly compression: the
first trial is twice the last accepted step (no BB), a search that would shrink the
step below 1e-3 of that asks for the exact gradient at x (``exact_fun``: one pass with
the sums sent exactly) and searches again along it -- which does go downhill, so the
fit reaches the optimum as exact gradient descent does, the compressed passes doing
what they can on the way -- and the relative-change test must hold ``MEMORY``
iterations in a row. Without ``exact_fun`` the search takes the last accepted step
anyway (error feedback sends the rest later), which stalls above the optimum on
ill-conditioned data (breast cancer, regParam 0.01, 1,000 iterations: qsgd:8 0.74
above, fp16 9e-4; with exact passes where the search fails both end as exact gd does).

``prox`` is the soft-threshold with ``t * l1`` (identity without L1), which
puts coefficients that are zero at the optimum at exactly zero.

Every evaluation of ``fun`` is one distributed pass; a trial that is accepted
also supplies the next gradient, so an accepted first trial costs one pass.
"""
from __future__ import annotations

import numpy as np

from ..penalties import soft_threshold
from .base import OptimResult, converged, l1_value

ARMIJO_C = 1e-4
MAX_HALVINGS = 60
MEMORY = 10
#: A compressed gradient's search that shrinks the step below this share of the last
#: accepted one goes on with exact gradients (when it can have them).
EXACT_BELOW = 0.1
#: ... and so does one that moves F by less than this, relatively, in an iteration.
SLOW_CHANGE = 1e-4


def minimize_gd(fun, x0, max_iter=100, tol=1e-6, step_size=None, l1=None, callback=None,
                inexact=False, exact_fun=None):
    def prox(v, t):
        return v if l1 is None else soft_threshold(v, t * l1)

    x = np.asarray(x0, dtype=np.float64).copy()
    fs, g = fun(x)  # smooth part
    f = fs + l1_value(l1, x)
    history = []
    t = 1.0
    t_ok = None                 # the last step a line search accepted
    calm = 0                    # iterations in a row within tol
    oracle = fun                # compressed gradients, until one leads nowhere
    s = yv = None
    message = "maxIter reached"
    done = False
    it = 0
    for it in range(1, int(max_iter) + 1):
        if step_size is not None:
            t = float(step_size)
            x_new = prox(x - t * g, t)
            fs_new, g_new = oracle(x_new)
            f_new = fs_new + l1_value(l1, x_new)
        else:
            if inexact:
                # compressed gradients' differences are mostly compression: no BB step,
                # try twice the last accepted one
                t = 1.0 if t_ok is None else 2.0 * t_ok
            elif s is not None:
                sy = float(s @ yv)
                t = float(s @ s) / sy if sy > 0 else 2.0 * t
            if not np.any(g) and l1 is None:
                history.append(f)
                message, done = "gradient is zero", True
                break
            # a compressed gradient must go downhill from here (monotone); an exact one
            # may take the non-monotone reference that BB's long steps need
            f_ref = f if inexact else max([f] + history[-MEMORY:])
            for _ in range(MAX_HALVINGS):
                x_new = prox(x - t * g, t)
                fs_new, g_new = oracle(x_new)
                f_new = fs_new + l1_value(l1, x_new)
                d = x_new - x
                if l1 is None:
                    ok = f_new <= f_ref - ARMIJO_C * t * float(g @ g)
                else:  # SpaRSA's non-monotone test for proximal steps
                    ok = f_new <= f_ref - ARMIJO_C / (2.0 * t) * float(d @ d)
                if ok:
                    t_ok = t
                    break
                t *= 0.5
                if inexact and t_ok is not None and t < EXACT_BELOW * t_ok:
                    if exact_fun is not None:
                        # a compressed gradient need not point downhill, and this one
                        # does not: from here on exact gradients (one pass each, the sums
                        # sent exactly) and gradient descent's own rules -- BB steps,
                        # the non-monotone reference -- which reach the optimum
                        oracle, inexact = exact_fun, False
                        _, g = oracle(x)
                        t, f_ref = t_ok, max([f] + history[-MEMORY:])
                        continue
                    # no exact pass to be had: step as the last accepted search did
                    # (error feedback sends the rest later)
                    t = t_ok
                    x_new = prox(x - t * g, t)
                    fs_new, g_new = oracle(x_new)
                    f_new = fs_new + l1_value(l1, x_new)
                    break
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
        if not np.any(s) and tol > 0:   # tol=0: every iteration runs, as the contract says
            message, done = "fixed point reached", True
            break
        if inexact and exact_fun is not None and step_size is None and \
                converged(f_prev, f, SLOW_CHANGE):
            # a line search with compressed gradients crawls here (no BB step can be had
            # with them): exact ones from the next iteration on, with gradient descent's
            # own rules (a fixed step keeps its compressed passes: error feedback does)
            oracle, inexact = exact_fun, False
            fs, g = oracle(x)
            s = None
        calm = calm + 1 if converged(f_prev, f, tol) else 0
        if calm >= (MEMORY if inexact else 1):
            # compressed gradients: a step can be small by chance, so it takes MEMORY
            # of them in a row
            message, done = "relative change of the objective <= tol", True
            break
    if not history:
        history.append(float(f))
    return OptimResult(x, float(f), history, it if history else 0, done, message)
