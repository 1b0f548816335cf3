"""Differentially private training (DP-SGD) on top of mode=sync.

One private step, top to bottom:

    engine.evaluate(theta, sample=(q, secret seed, t), work=clip C): every task draws
        its rows with probability q (Poisson sampling) and sums their per-example
        gradients, each clipped to norm C (:func:`sparkgd.privacy.clipped_sums`)
    -> driver: + N(0, sigma^2 C^2) noise (from the OS's entropy), / (q n), + the L2
       penalty's gradient -> the first-order optimizer's step (L1: its prox step)

The noise is added once, on the driver, to the summed gradient: the driver (and the
links to it) see per-task clipped sums without noise, so it is trusted as Spark's
driver is trusted with the data anyway; what leaves the fit -- the model -- is private.
sigma is calibrated before the first step so that ``maxIter`` steps at sampling rate
``q = miniBatchFraction`` spend at most ``dpEpsilon`` at ``dpDelta``
(:func:`sparkgd.privacy.calibrate_sigma`, Google's dp-accounting RDP accountant); the
summary reports the epsilon the steps taken actually spent.

What the guarantee does not cover, and so the fit does without: ``tol`` (a stopping
rule reads the data: DP runs all ``maxIter`` steps), a line search (lbfgs, gd),
standardization (the features' moments), the starting intercept from label counts.
``objectiveHistory`` holds F values computed without noise: they are for the operator,
not for release.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from .. import codecs, privacy
from ..errors import SparkgdError
from . import sync
from .sync import DistributedObjective

log = logging.getLogger("sparkgd")

#: Optimizers a private fit can use: each step reads one noised gradient.
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam")


def fit(engine, problem, plan, keep):
    """DP-SGD (mode sync, see the package for the signature): sigma calibrated to
    ``plan.dp`` before the first step, every step's gradient clipped and noised, all
    ``maxIter`` steps taken (a stopping rule reads the data)."""
    dp = plan.dp
    privacy_plan = Privacy(problem.rows, plan.mini_batch_fraction, plan.max_iter,
                           dp["clip"], delta=dp.get("delta"), epsilon=dp.get("epsilon"),
                           sigma=dp.get("sigma"))
    log.info("DP-SGD: noise multiplier %.4g for %d steps at sampling rate %g (delta %g, "
             "clip %g)", privacy_plan.sigma, privacy_plan.steps, privacy_plan.q,
             privacy_plan.delta, privacy_plan.clip)
    objective = PrivateObjective(engine, problem.loss, problem.layout, problem.penalty,
                                 privacy_plan)
    result = sync.run(objective, problem.x0, optimizer=plan.optimizer,
                      max_iter=plan.max_iter, tol=0.0, step_size=plan.step_size,
                      **keep.saving())
    result.privacy = privacy_plan.summary(result.iterations)
    return result


class Privacy:
    """The privacy parameters of one fit, fixed before its first step."""

    def __init__(self, n, q, steps, clip, delta=None, epsilon=None, sigma=None):
        self.n, self.q, self.steps, self.clip = int(n), float(q), int(steps), float(clip)
        self.delta = privacy.default_delta(self.n) if delta is None else float(delta)
        if sigma is None:
            try:
                sigma = privacy.calibrate_sigma(float(epsilon), self.q, self.steps,
                                                self.delta)
            except ValueError as e:
                raise SparkgdError(f"dpEpsilon: {e}") from None
        self.sigma = float(sigma)

    def summary(self, steps_taken):
        """``summary.privacy``: what the steps taken spent."""
        spent = privacy.epsilon(self.q, self.sigma, steps_taken, self.delta) \
            if steps_taken > 0 else 0.0
        return {"epsilon": float(spent), "delta": self.delta, "noiseMultiplier": self.sigma,
                "maxGradNorm": self.clip, "samplingRate": self.q, "steps": int(steps_taken),
                "accountant": privacy.ACCOUNTANT}


class PrivateObjective(DistributedObjective):
    """:class:`~sparkgd.modes.sync.DistributedObjective` whose mini-batch gradient is
    DP-SGD's: Poisson sample of secret seed, clipped per example, noised, over q n.
    ``smooth(theta)`` without a sample stays the exact F (for the operator's history)."""

    def __init__(self, engine, loss, layout, penalty, plan):
        super().__init__(engine, loss, layout, penalty, codecs.NONE, codecs.NONE)
        self.plan = plan
        self._rng = privacy.noise_generator()
        # which rows a step drew must stay as secret as the noise: not the user's seed
        self._seed = int(self._rng.integers(0, 1 << 62))

    def smooth(self, theta, sample=None, exact=False):
        if sample is None:
            return super().smooth(theta, None, exact)
        _q, _seed, iteration = sample
        plan = self.plan
        theta = np.asarray(theta, dtype=np.float64)
        total = self.engine.evaluate(theta, self.loss, self.layout,
                                     (plan.q, self._seed, iteration), codecs.NONE, codecs.NONE,
                                     work={"mode": "dp", "clip": plan.clip})
        self.evaluations += 1
        noise = privacy.noise(self.layout.size, plan.sigma, plan.clip, self._rng)
        grad = privacy.dp_step_gradient(total[2:], noise, plan.q * plan.n)
        # the sampled loss over the expected batch, as the gradient (an empty sample is
        # 0, not a divergence): not private (no noise), only for the progress line
        f = float(total[0] / (plan.q * plan.n))
        return self.penalty.add_l2(f, grad, theta)

    __call__ = smooth


def check(est):
    """What a private fit refuses (before Spark starts): -> the param that enabled DP,
    or None when DP is off."""
    eps, sigma = est.getDpEpsilon(), est.getNoiseMultiplier()
    if eps is None and sigma is None:
        return None
    name = "dpEpsilon" if eps is not None else "noiseMultiplier"
    if eps is not None and sigma is not None:
        raise SparkgdError("give dpEpsilon (sigma is calibrated to it) or noiseMultiplier, "
                           "not both")
    if eps is not None and not 0 < eps < math.inf:
        raise SparkgdError(f"dpEpsilon must be > 0 and finite (got {eps})")
    if sigma is not None and not 0 < sigma < math.inf:
        raise SparkgdError(f"noiseMultiplier must be > 0 and finite (got {sigma})")
    if not 0 < est.getMaxGradNorm() < math.inf:
        raise SparkgdError(f"maxGradNorm must be > 0 and finite (got {est.getMaxGradNorm()})")
    delta = est.getDpDelta()
    if delta is not None and not 0 < delta < 1:
        raise SparkgdError(f"dpDelta must be in (0, 1) (got {delta})")
    if est.getOptimizer() not in OPTIMIZERS:
        raise SparkgdError(
            f"{name}: DP-SGD takes one noised gradient per step; optimizer "
            f"'{est.getOptimizer()}' needs exact gradients or objective values (a line "
            f"search reads the data): use one of {', '.join(OPTIMIZERS)}")
    if est.getMode() != "sync":
        raise SparkgdError(f"{name}: DP-SGD runs in mode sync (mode {est.getMode()} takes "
                           "steps no noise covers)")
    if est.getCompression() != "none":
        raise SparkgdError(f"{name}: compression carries unnoised residuals from step to "
                           "step; use compression none")
    if est.getStandardization():
        raise SparkgdError(f"{name}: standardization scales by the features' moments, which "
                           "the privacy guarantee does not cover; scale the features "
                           "beforehand (e.g. to norm <= 1) and leave standardization off")
    return name
