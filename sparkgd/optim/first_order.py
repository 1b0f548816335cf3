"""sgd, momentum, nesterov, adam: each a pair of pure functions (init, update).

``init(x) -> state`` and ``update(grad, state) -> (delta, state, step)`` where
``delta`` is added to the parameters and ``step`` is the (scalar or
per-coordinate) step the proximal L1 map uses: the step that ``delta`` takes
along the gradient at a fixed point, so the L1 optimum is a fixed point. States are NamedTuples of plain
NumPy values and ints, so they checkpoint and resume as they are.

| name | update | default step |
| --- | --- | --- |
| sgd | ``-lr_t g``, ``lr_t = stepSize / sqrt(t)`` | 1.0 |
| momentum | ``v = mu v + g``; ``-lr v`` (heavy ball), mu = 0.9 | 0.1 |
| nesterov | ``v = mu v + g``; ``-lr (mu v + g)`` (Sutskever's form), mu = 0.9 | 0.1 |
| adam | bias-corrected ``-lr m / (sqrt(v) + eps)``, 0.9 / 0.999 / 1e-8 | 0.01 |
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..penalties import soft_threshold
from .base import OptimResult, converged, l1_value

DEFAULT_STEP = {"sgd": 1.0, "momentum": 0.1, "nesterov": 0.1, "adam": 0.01}


class Transform(NamedTuple):
    init: object
    update: object


class SgdState(NamedTuple):
    count: int


class MomentumState(NamedTuple):
    count: int
    velocity: np.ndarray


class AdamState(NamedTuple):
    count: int
    mu: np.ndarray
    nu: np.ndarray


def sgd(lr, decay=True):
    def init(x):
        return SgdState(0)

    def update(g, state):
        t = state.count + 1
        step = lr / np.sqrt(t) if decay else lr
        return -step * g, SgdState(t), step

    return Transform(init, update)


def momentum(lr, mu=0.9, nesterov=False):
    def init(x):
        return MomentumState(0, np.zeros_like(x))

    def update(g, state):
        v = mu * state.velocity + g
        direction = mu * v + g if nesterov else v
        # At a fixed point v = g / (1 - mu): the proximal step must use that
        # effective step, or L1 would be weakened by a factor 1 - mu.
        return -lr * direction, MomentumState(state.count + 1, v), lr / (1.0 - mu)

    return Transform(init, update)


def adam(lr, b1=0.9, b2=0.999, eps=1e-8):
    def init(x):
        return AdamState(0, np.zeros_like(x), np.zeros_like(x))

    def update(g, state):
        t = state.count + 1
        m = b1 * state.mu + (1 - b1) * g
        v = b2 * state.nu + (1 - b2) * g * g
        m_hat = m / (1 - b1 ** t)
        v_hat = v / (1 - b2 ** t)
        step = lr / (np.sqrt(v_hat) + eps)  # per coordinate
        return -step * m_hat, AdamState(t, m, v), step

    return Transform(init, update)


def make(name, step_size=None):
    lr = DEFAULT_STEP[name] if step_size is None else float(step_size)
    if name == "sgd":
        return sgd(lr)
    if name == "momentum":
        return momentum(lr)
    if name == "nesterov":
        return momentum(lr, nesterov=True)
    if name == "adam":
        return adam(lr)
    raise ValueError(f"unknown first-order optimizer {name!r}")


def minimize_first_order(name, fun, x0, max_iter=100, tol=1e-6, step_size=None, l1=None,
                         callback=None, batch_fun=None):
    """Iterate ``x <- prox(x + delta)``; one evaluation (full or mini-batch) per iteration."""
    opt = make(name, step_size)
    x = np.asarray(x0, dtype=np.float64).copy()
    state = opt.init(x)
    stochastic = batch_fun is not None

    def evaluate(v, it):
        fs, g = batch_fun(v, it) if stochastic else fun(v)
        return fs + l1_value(l1, v), g

    f, g = evaluate(x, 0)
    history = []
    message, done, it = "maxIter reached", False, 0
    for it in range(1, int(max_iter) + 1):
        delta, state, step = opt.update(g, state)
        x_new = x + delta
        if l1 is not None:
            x_new = soft_threshold(x_new, step * l1)
        f_prev = f
        f, g = evaluate(x_new, it)
        s = x_new - x
        x = x_new
        history.append(float(f))
        if callback is not None:
            callback(it, float(f), float(np.linalg.norm(g)), float(np.linalg.norm(s)))
        if not np.isfinite(f):
            message = "objective is not finite (step size too large?)"
            break
        if converged(f_prev, f, tol):
            message, done = "relative change of the objective <= tol", True
            break
    if not history and not stochastic:
        history.append(float(f))
    elif stochastic:
        # The last entry is always F on the full data at the returned point.
        fs, _ = fun(x)
        f = float(fs) + l1_value(l1, x)
        if history:
            history[-1] = f
        else:
            history.append(f)
    return OptimResult(x, float(f), history, it if max_iter > 0 else 0, done, message)
