"""Optimizers. None of them touches Spark: each sees only ``fun(x) -> (F, grad)``.

``minimize(name, fun, x0, ...)`` runs one and returns an :class:`OptimResult`.

* ``fun`` is the smooth part of the objective (loss + L2) on the full data.
* ``l1`` (optional) is a per-coordinate weight vector: the objective is
  ``fun(x)[0] + sum_j l1_j |x_j|``. L-BFGS handles it with the split
  ``x = p - q, p, q >= 0`` on L-BFGS-B; every first-order method with a
  soft-threshold (proximal) step, which gives exact zeros.
* ``batch_fun(x, iteration)`` (optional, the :data:`STOCHASTIC` ones) estimates ``fun`` on a fresh
  mini-batch; the last history entry is then replaced by the full objective
  at the returned point.

The stopping rule is shared (:func:`converged`): the relative change of the
objective between two iterations, ``|F_prev - F| / max(|F_prev|, |F|, 1)``,
is at most ``tol`` (``tol=0`` runs all ``max_iter`` iterations).
"""
from __future__ import annotations

import numpy as np

from .base import OptimResult, converged, l1_value

__all__ = ["OPTIMIZERS", "STOCHASTIC", "OptimResult", "converged", "l1_value", "minimize",
           "preload"]

OPTIMIZERS = ("lbfgs", "gd", "sgd", "momentum", "nesterov", "adam")
#: The optimizers that can step on mini-batch estimates (``miniBatchFraction < 1``).
STOCHASTIC = ("sgd", "momentum", "nesterov", "adam")


def preload(name):
    """Import an optimizer's module in a background thread (SciPy's optimizers take
    0.3 s to import: a fit overlaps that with building its blocks)."""
    if name != "lbfgs":
        return
    import importlib
    import threading

    def load():
        try:
            importlib.import_module("sparkgd.optim.lbfgs")
        except Exception:  # pragma: no cover - the fit's own import reports it
            pass

    threading.Thread(target=load, name="sparkgd-preload", daemon=True).start()


def minimize(name, fun, x0, max_iter=100, tol=1e-6, step_size=None, l1=None, callback=None,
             batch_fun=None, inexact=False, exact_fun=None):
    """Minimize ``fun(x)[0] + sum_j l1_j |x_j|`` from ``x0`` with optimizer ``name``.

    ``callback(iteration, F, grad_norm, step)`` is called after each iteration,
    with ``step`` the length of the step just taken. ``inexact``: the gradients are
    compressed (F is exact): gd's line search then steps without BB, does not stop on
    one small change, and searches along ``exact_fun``'s gradient (one exact pass)
    where the compressed one does not go downhill (see
    :func:`~sparkgd.optim.gd.minimize_gd`).
    """
    x0 = np.asarray(x0, dtype=np.float64)
    if l1 is not None and not np.any(l1 > 0):
        l1 = None
    if name == "lbfgs":
        from .lbfgs import minimize_lbfgs

        return minimize_lbfgs(fun, x0, max_iter=max_iter, tol=tol, l1=l1, callback=callback)
    if name == "gd":
        from .gd import minimize_gd

        return minimize_gd(fun, x0, max_iter=max_iter, tol=tol, step_size=step_size, l1=l1,
                           callback=callback, inexact=inexact, exact_fun=exact_fun)
    if name in ("sgd", "momentum", "nesterov", "adam"):
        from .first_order import minimize_first_order

        return minimize_first_order(name, fun, x0, max_iter=max_iter, tol=tol,
                                    step_size=step_size, l1=l1, callback=callback,
                                    batch_fun=batch_fun)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")
