"""The penalty ``regParam * ((1 - a)/2 ||beta||^2 + a ||beta||_1)``, intercepts excluded.

With ``standardization=True`` the penalty applies to the scaled coefficients
``beta_j * std_j`` (Spark ML's meaning), so each coordinate carries a weight:
``std_j^2`` in the L2 term and ``std_j`` in the L1 term (1 and 1 otherwise).

The smooth L2 part is added to the objective and gradient on the driver; the
L1 part belongs to the optimizer: a soft-threshold (proximal) step for the
first-order methods, the split ``beta = p - q`` for L-BFGS.
"""
from __future__ import annotations

import numpy as np


class Penalty:
    """Elastic-net penalty over the flat parameter vector ``theta``.

    ``l2_weights`` / ``l1_weights`` have one entry per parameter (0 for
    intercepts), already multiplied by ``regParam * (1 - a)`` and ``regParam * a``.
    """

    def __init__(self, layout, reg_param=0.0, elastic_net_param=0.0, feature_scale=None):
        self.layout = layout
        reg, a = float(reg_param), float(elastic_net_param)
        per_feature = np.ones(layout.d) if feature_scale is None else np.asarray(feature_scale)
        coef_l2 = np.tile(per_feature ** 2, layout.k)
        coef_l1 = np.tile(per_feature, layout.k)
        self.l2_weights = np.zeros(layout.size)
        self.l1_weights = np.zeros(layout.size)
        self.l2_weights[: layout.n_coef] = reg * (1.0 - a) * coef_l2
        self.l1_weights[: layout.n_coef] = reg * a * coef_l1
        self.has_l1 = bool(np.any(self.l1_weights > 0))

    def add_l2(self, f, grad, theta):
        """Add ``1/2 sum_j l2_j theta_j^2`` to (f, grad) in place."""
        wt = self.l2_weights * theta
        f += 0.5 * float(wt @ theta)
        grad += wt
        return f, grad


def soft_threshold(x, thresholds):
    """The L1 proximal map: ``sign(x) max(|x| - t, 0)``, exact zeros included."""
    return np.sign(x) * np.maximum(np.abs(x) - thresholds, 0.0)
