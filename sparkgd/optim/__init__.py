"""Optimizers. None of them touches Spark: each sees only ``fun(theta) -> (F, grad)``.

``minimize(name, fun, x0, ...)`` runs one and returns an :class:`OptimResult`.
The stopping rule is shared (:func:`converged`): the relative change of the
objective between two iterations, ``|F_prev - F| / max(|F_prev|, |F|, 1)``,
is at most ``tol`` (``tol=0`` runs all ``max_iter`` iterations).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

OPTIMIZERS = ("lbfgs", "gd")


@dataclass
class OptimResult:
    x: np.ndarray
    fun: float
    history: list = field(default_factory=list)  # F after each iteration
    iterations: int = 0
    converged: bool = False
    message: str = ""


def converged(f_prev, f, tol):
    return abs(f_prev - f) <= tol * max(abs(f_prev), abs(f), 1.0)


def minimize(name, fun, x0, max_iter=100, tol=1e-6, step_size=None, callback=None):
    """Minimize ``fun`` from ``x0`` with optimizer ``name``.

    ``callback(iteration, F, grad_norm, step)`` is called after each iteration,
    with ``step`` the length of the step just taken.
    """
    if name == "lbfgs":
        from .lbfgs import minimize_lbfgs

        return minimize_lbfgs(fun, x0, max_iter=max_iter, tol=tol, callback=callback)
    if name == "gd":
        from .gd import minimize_gd

        return minimize_gd(fun, x0, max_iter=max_iter, tol=tol, step_size=step_size,
                           callback=callback)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")
