"""What one pass computes on a task's blocks: the work the coordinator asks for.

The engine carries passes -- theta out, a float64 vector back from every task, added
up by the topology -- and knows nothing of what the vector means. That is the mode's
business, said by a plain, JSON-able ``work`` description (it crosses the hub's wire
as JSON: nothing is unpickled):

=======================================  =============================================
``None``                                 the gradient sums ``[loss, W, grad...]`` (sync,
                                         and every exact F); a pass's ``sample``
                                         ``(fraction, seed, iteration)`` draws a
                                         Bernoulli mini-batch
``{"mode": "dp", "clip": C}``            DP-SGD: per-example gradients clipped to norm
                                         C, over a Poisson sample
``{"mode": "async", "fraction": q}``     a push of mode=async: a mini-batch of ``q``;
                                         the frame's ``fraction`` is ``q`` times the
                                         share of row chunks a slow task is asked for
``{"mode": "local", ...}``               a round of local steps (mode=local,
                                         :class:`sparkgd.modes.local.Work`)
``{"mode": "metrics", "rule": {...}}``   the training metrics' sums at theta
                                         (:func:`sparkgd.metrics.block_sums`)
``{"mode": "hessian", "kind": k}``       coefficient statistics' sums at theta, k
                                         ``linear`` or ``logistic``
                                         (:func:`sparkgd.inference.block_sums`)
``{"mode": "read"}``                     one read of every block (its values summed):
                                         the floor a pass is judged against
``{"mode": "models"}``                   the gradient sums of ``layout.k`` models of a
                                         single-output loss at once (fitMultiple;
                                         :func:`sparkgd.kernels.models_sums`)
=======================================  =============================================

:func:`parse` is what the engine is given (as a value: the engine imports nothing of
the modes, nor of privacy) and calls once per configuration, on the task or in the
job of a pass; the :class:`Worker` it returns is called for every pass.
"""
from __future__ import annotations

import numpy as np

from . import inference, kernels, metrics, privacy
from .modes import local


class Worker:
    """The gradient sums (and, with ``clip``, DP-SGD's clipped ones)."""

    def __init__(self, clip=None, base_fraction=None):
        self.clip = clip
        self.base_fraction = base_fraction

    def size(self, layout):
        """Floats in a reply."""
        return 2 + layout.size

    def compute(self, blocks, theta, loss, layout, sample, index, threads=1):
        """This task's vector for ``theta``; ``sample``: the pass's ``(fraction, seed,
        iteration)`` or None (every row)."""
        fraction, seed, iteration = (1.0, 0, 0) if sample is None else sample
        # mode=async asks a slow task for a lighter push: ``fraction`` is then the user's
        # mini-batch fraction times the share of row chunks to compute
        q = fraction if self.base_fraction is None else self.base_fraction
        keep = 1.0 if self.base_fraction is None else fraction / q
        rows = None if q >= 1.0 else (q, seed, iteration, index)
        chunks = None if keep >= 1.0 else (keep, seed, iteration, index)
        return kernels.partition_sums(blocks, theta, loss, layout, sample=rows,
                                      threads=threads, chunks=chunks,
                                      piece_sums=privacy.clipping(self.clip))


class RoundWorker(Worker):
    """mode=local: a round of local steps; the round's number is ``sample[2]``."""

    def __init__(self, work):
        super().__init__()
        self.work = work

    def compute(self, blocks, theta, loss, layout, sample, index, threads=1):
        # (several passes over the blocks: a list of them, or streamed ones read again)
        blocks = blocks if getattr(blocks, "streamed", False) else list(blocks)
        return local.round_sums(blocks, theta, loss, layout, self.work, sample[2],
                                index, threads)


class MetricsWorker(Worker):
    """The training metrics' sums at theta (one more pass over the blocks)."""

    def __init__(self, rule):
        super().__init__()
        self.rule = rule

    def size(self, layout):
        return metrics.vector_size(self.rule)

    def compute(self, blocks, theta, loss, layout, sample, index, threads=1):
        coef, intercept = layout.split(np.asarray(theta, dtype=np.float64))
        return metrics.block_sums(blocks, coef, intercept, self.rule)


class ReadWorker(Worker):
    """The floor of a pass: each block's stored bytes read once (``[sum of X's stored
    values, rows]``), in the threads a pass uses, with nothing else computed."""

    def size(self, layout):
        return 2

    def compute(self, blocks, theta, loss, layout, sample, index, threads=1):
        return kernels.read_sums(blocks, threads)


class ModelsWorker(Worker):
    """Several models' gradient sums in one read of the blocks (fitMultiple)."""

    def size(self, layout):
        return 2 + layout.k + layout.size

    def compute(self, blocks, theta, loss, layout, sample, index, threads=1):
        if loss.n_outputs(2) != 1:
            raise ValueError(f"several models of the {loss.name} loss at once")
        return kernels.models_sums(blocks, theta, loss, layout, threads)


class HessianWorker(Worker):
    """The coefficient statistics' sums at theta (one more pass over the blocks)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def size(self, layout):
        return inference.vector_size(layout.d + (1 if layout.fit_intercept else 0))

    def compute(self, blocks, theta, loss, layout, sample, index, threads=1):
        return inference.block_sums(blocks, theta, layout, self.kind)


def parse(work, layout):
    """``work`` (see the module) -> its :class:`Worker`; ValueError when it is not one
    this version computes (a frame from elsewhere)."""
    if work is None:
        return Worker()
    mode = work.get("mode") if isinstance(work, dict) else None
    if mode == "dp":
        clip = float(work["clip"])
        if not 0 < clip < float("inf"):
            raise ValueError(f"a clip bound of {clip}")
        return Worker(clip=clip)
    if mode == "async":
        fraction = float(work["fraction"])
        if not 0 < fraction <= 1:
            raise ValueError(f"a mini-batch fraction of {fraction}")
        return Worker(base_fraction=fraction)
    if mode == "local":
        return RoundWorker(local.Work.from_config(work, layout.d))
    if mode == "hessian":
        kind = work.get("kind")
        if kind not in ("linear", "logistic") or layout.k != 1 or \
                layout.d > inference.MAX_FEATURES:
            raise ValueError(f"coefficient statistics of kind {kind!r} at width {layout.d}")
        return HessianWorker(kind)
    if mode == "read":
        return ReadWorker()
    if mode == "models":
        return ModelsWorker()
    if mode == "metrics":
        rule = work.get("rule")
        if not isinstance(rule, dict) or rule.get("kind") not in (
                "regression", "binary", "multiclass"):
            raise ValueError(f"a metrics rule {rule!r}")
        if rule["kind"] != "regression":
            k = int(rule["k"])
            if not 2 <= k <= metrics.MAX_BLOCK_CLASSES or k != layout.k and k != 2:
                raise ValueError(f"metrics for {k} classes")
        return MetricsWorker(rule)
    raise ValueError(f"unknown work {mode!r}")
