"""The penalty ``regParam * ((1 - a)/2 ||beta||^2 + a ||beta||_1)``, intercepts excluded.

The smooth L2 part is added to the objective and gradient on the driver; the
L1 part belongs to the optimizer (proximal steps, or the split for L-BFGS).
"""
from __future__ import annotations

import numpy as np


def l2_strength(reg_param, elastic_net_param=0.0):
    return float(reg_param) * (1.0 - float(elastic_net_param))


def add_l2(f, grad, theta, n_coef, strength):
    """Add ``strength/2 ||beta||^2`` to (f, grad) in place; beta = theta[:n_coef]."""
    if strength:
        beta = theta[:n_coef]
        f += 0.5 * strength * float(beta @ beta)
        grad[:n_coef] += strength * beta
    return f, grad
