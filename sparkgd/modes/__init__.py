"""Training loops, one module each, all with one signature::

    fit(engine, problem, plan, keep) -> FitResult

* :mod:`.sync` -- bulk-synchronous: every pass is the gradient at one theta, the
  driver's optimizer steps (DP-SGD, :mod:`.dp`, is sync with a private gradient);
* :mod:`.local` -- local SGD: a pass is a round of local steps on every task;
* :mod:`.ps` -- async: a parameter server applies each task's push as it arrives.

``engine``: the passes (:class:`sparkgd.engine.Engine`); ``problem``: what is
minimized and from where (:class:`Problem`); ``plan``: the user's settings (a
:class:`sparkgd.coordinator.Plan`: optimizer, step, iterations, tol, mini-batches,
local steps, staleness, privacy); ``keep``: what lets a fit go on after a loss
(:class:`Keep`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import codecs


@dataclass
class Problem:
    """What a fit minimizes, in which space, from where."""

    loss: object                   # a sparkgd.kernels.Loss
    layout: object                 # a sparkgd.kernels.Layout
    penalty: object                # a sparkgd.penalties.Penalty
    x0: np.ndarray                 # the start, in theta space
    pre: object = None             # a sparkgd.stats.Preconditioner: the optimizer's space
    scale: np.ndarray = None       # standardization's feature scale (or None)
    codec: object = codecs.NONE    # how tasks encode their sums
    weight: float = 0.0            # W: the rows' total weight
    rows: int = 0                  # n: the number of rows


@dataclass
class Keep:
    """What a fit keeps so that it can go on: ``checkpoint`` (a
    :class:`sparkgd.checkpoint.Checkpointer`, or None), ``resumed`` (the meta of the
    checkpoint resumed from, or None), ``recovery`` (a
    :class:`sparkgd.checkpoint.Recovery`: the same fit's earlier attempts, in memory)."""

    checkpoint: object = None
    resumed: dict = None
    recovery: object = None

    def saving(self):
        return dict(checkpoint=self.checkpoint, resumed=self.resumed, recovery=self.recovery)
