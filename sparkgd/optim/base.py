"""What every optimizer shares: its result, the stopping rule, the L1 term."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class OptimResult:
    x: np.ndarray
    fun: float
    history: list = field(default_factory=list)  # F after each iteration
    iterations: int = 0
    converged: bool = False
    message: str = ""


def converged(f_prev, f, tol):
    """The contract's stopping rule; ``tol <= 0`` never stops (all maxIter iterations
    run, even once F stops changing)."""
    return tol > 0 and abs(f_prev - f) <= tol * max(abs(f_prev), abs(f), 1.0)


def l1_value(l1, x):
    return 0.0 if l1 is None else float(l1 @ np.abs(x))
