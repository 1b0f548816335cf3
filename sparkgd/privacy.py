"""Differentially private SGD (DP-SGD, Abadi et al. 2016): accounting, per-example
clipping and noise, as pure functions of NumPy values (no Spark).

One DP-SGD step on a Poisson sample of the rows (each row drawn with probability q):

    g_i = w_i * loss'(z_i) (x) [x_i, 1]           per-example gradient ([x_i] without intercept)
    S   = sum_i g_i * min(1, C / ||g_i||)          :func:`clipped_sums`, on the executors
    g   = (S + N(0, sigma^2 C^2 I)) / (q n)        :func:`noise`, :func:`dp_step_gradient`

then the penalty's gradient and the optimizer's step. Adding or removing one row
moves ``S`` by at most ``C``, so each step is a Poisson-subsampled Gaussian mechanism
with noise multiplier ``sigma``; the guarantee is for add-or-remove-one-row neighbours.

Accounting uses Google's ``dp-accounting`` library (a maintained, reviewed accountant
rather than a formula of our own) with its RDP accountant: the standard for DP-SGD
(the moments accountant of Abadi et al. is RDP), fast whatever the number of steps
(composing ``steps`` identical steps multiplies one RDP curve by ``steps``: about
0.05 s for 10,000 steps), and conservative (the RDP to (epsilon, delta) conversion is
an upper bound on epsilon). Its PLD accountant (``dp_accounting.pld``) is the tighter
alternative: q=0.01, sigma=1.1, 10,000 steps, delta=1e-5 give epsilon 5.19 by PLD and
5.63 by RDP, at 0.8 s instead of 0.06 s.

``dp_accounting`` is imported inside the accountant's functions: they run on the
driver, while executors import this module only to clip.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import warnings
from importlib import metadata

import numpy as np
import scipy.sparse as sp

from .errors import SparkgdError
from .kernels import add_gradient, chunk_derivative, row_chunks

try:
    ACCOUNTANT = f"rdp (dp-accounting {metadata.version('dp-accounting')})"
except metadata.PackageNotFoundError:  # an executor needs the clipping, not the accountant
    ACCOUNTANT = "rdp (dp-accounting not installed)"

#: Test-only: an integer here seeds :func:`noise_generator`, which voids the guarantee.
SEED_ENV = "SPARKGD_TESTING_DP_SEED"

#: :func:`calibrate_sigma` gives up above this noise multiplier: noise a million times the
#: clip bound leaves nothing to learn. (At delta=1e-10 the RDP accountant still says
#: epsilon=0.015 there; epsilon falls slowly at large sigma.)
SIGMA_MAX = 1e6

# ----------------------------------------------------------------------------
# Accounting (driver side).
# ----------------------------------------------------------------------------


def _check(q, steps, delta):
    if not 0 < q <= 1:
        raise ValueError(f"sampling rate q must be in (0, 1] (got {q})")
    if not (float(steps).is_integer() and steps >= 1):
        raise ValueError(f"steps must be an integer >= 1 (got {steps})")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1) (got {delta})")


def epsilon(q, sigma, steps, delta):
    """The epsilon at ``delta`` of ``steps`` DP-SGD steps, each on a Poisson sample of
    rate ``q`` with noise multiplier ``sigma`` (noise std ``sigma * C``); ``inf`` for
    ``sigma = 0``."""
    _check(q, steps, delta)
    if not sigma >= 0:
        raise ValueError(f"noise multiplier sigma must be >= 0 (got {sigma})")
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    step = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    # at small sigma some RDP orders do not converge and are left out (the bound stays
    # valid); the library says so through absl's logger at WARNING, once per order
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        accountant = RdpAccountant()
        accountant.compose(dp_accounting.SelfComposedDpEvent(step, int(steps)))
        return float(accountant.get_epsilon(delta))
    finally:
        absl.setLevel(level)


def calibrate_sigma(target_epsilon, q, steps, delta):
    """The smallest noise multiplier sigma with ``epsilon(q, sigma, steps, delta) <=
    target_epsilon``, to a relative 1e-6 or so.

    epsilon falls as sigma grows, so a doubling or halving search brackets the
    answer, then Brent's method on ``log epsilon`` against ``log sigma`` (nearly a
    line) narrows it in a few evaluations. The answer is the smallest sigma
    evaluated that meets the target, so it meets it exactly, not up to a tolerance.
    """
    from scipy import optimize

    _check(q, steps, delta)
    if not 0 < target_epsilon < math.inf:
        raise ValueError(f"target epsilon must be > 0 and finite (got {target_epsilon})")
    best = [math.inf]

    @functools.lru_cache(maxsize=None)   # Brent starts from the bracket's two ends
    def gap(log_sigma):
        sigma = math.exp(log_sigma)
        eps = epsilon(q, sigma, steps, delta)
        if eps <= target_epsilon:
            best[0] = min(best[0], sigma)
        # clamped so inf (tiny sigma) and 0 (tiny q) stay finite for Brent's interpolation
        return math.log(min(max(eps, 1e-300), 1e300)) - math.log(target_epsilon)

    step = math.log(2.0)
    if gap(0.0) > 0:        # sigma = 1 is too little noise: double
        lo, hi = 0.0, step
        while gap(hi) > 0:
            if hi > math.log(SIGMA_MAX):
                raise ValueError(
                    f"no noise multiplier up to {SIGMA_MAX:g} gives epsilon <= "
                    f"{target_epsilon} at delta={delta}: the RDP accountant cannot "
                    f"certify so small an epsilon")
            lo, hi = hi, hi + step
    else:                   # enough: halve (epsilon grows without bound as sigma -> 0)
        lo, hi = -step, 0.0
        while gap(lo) <= 0:
            lo, hi = lo - step, lo
    optimize.brentq(gap, lo, hi, xtol=1e-6)
    return best[0]


def default_delta(n):
    """``1 / (10 n)`` rounded down to one significant digit: n=569 -> 1e-4,
    n=200000 -> 5e-7. Integer arithmetic, so no rounding error picks the digit."""
    n = int(n)
    if n < 1:
        raise ValueError(f"the number of rows must be >= 1 (got {n})")
    digits = len(str(10 * n - 1))      # the smallest k with 10**k >= 10 n
    lead = 10 ** digits // (10 * n)    # 1..9: the leading digit of 10**k / (10 n)
    return float(f"{lead}e-{digits}")


# ----------------------------------------------------------------------------
# Clipping (executor side).
# ----------------------------------------------------------------------------


def clipped_sums(X, y, w, theta, loss, layout, C):
    """One block's ``[loss_sum, weight_sum, grad...]``, laid out as
    :func:`sparkgd.kernels.block_sums`, with each row's gradient clipped to L2 norm ``C``.

    A linear model's per-example gradient is ``w_i dz_i (x) [x_i, 1]`` with
    ``dz_i = d loss / d z`` (K values for multinomial, coefficients then intercepts as
    in :class:`sparkgd.kernels.Layout`), so its norm is
    ``||w_i dz_i|| sqrt(||x_i||^2 + 1)`` (no ``+ 1`` without intercept): one row norm
    per row, no per-example gradient is formed. The weight is inside the clipped
    gradient, so every row adds at most ``C``.

    ``loss_sum`` and ``weight_sum`` are not clipped: they are not part of the private
    release (the accountant covers the noised gradient alone), so nothing computed
    from them -- an objective value, a stopping rule -- may leave the driver as private.
    """
    if not 0 < C < math.inf:
        raise ValueError(f"clip bound C must be > 0 and finite (got {C})")
    out = np.zeros(2 + layout.size)
    for Xc, yc, wc in row_chunks(X, y, w):
        out += _clipped_sums(Xc, yc, wc, theta, loss, layout, C)
    return out


def _clipped_sums(X, y, w, theta, loss, layout, C):
    if y.shape[0] == 0:
        return np.zeros(2 + layout.size)
    X, out, wdz = chunk_derivative(X, y, w, theta, loss, layout)
    sq = np.asarray(X.multiply(X).sum(axis=1)).ravel() if sp.issparse(X) else \
        np.einsum("ij,ij->i", X, X)
    if layout.fit_intercept:
        sq += 1.0
    norm = np.sqrt(np.einsum("ij,ij->i", wdz, wdz)) * np.sqrt(sq)
    wdz = wdz * (C / np.maximum(norm, C))[:, None]   # min(1, C / norm), and 1 at norm 0
    return add_gradient(out, X, wdz, layout)


def clipping(C):
    """The row-chunk kernel of a DP-SGD pass (``kernels.partition_sums(piece_sums=)``):
    :func:`clipped_sums` at clip bound ``C``; None (the plain kernel) for ``C`` None."""
    return None if C is None else functools.partial(clipped_sums, C=float(C))


def check_weights(max_weight, param="dpEpsilon"):
    """Refuse row weights above 1 under DP. The guarantee is per row, and ``C`` bounds
    one example's gradient: a weight above 1 usually stands for several examples
    (which one row's epsilon does not cover), and clipping its weighted gradient to
    ``C`` would quietly undo the weight. ``param`` names the param that enabled DP."""
    if not max_weight <= 1:
        raise SparkgdError(
            f"{param}: row weights must be at most 1 (the clip bound C assumes each "
            f"row's weight <= 1); found a weight of {max_weight:g}")


# ----------------------------------------------------------------------------
# Noise and the noisy step (driver side).
# ----------------------------------------------------------------------------


def noise_generator():
    """The generator DP noise comes from: seeded from the OS entropy source (NumPy's
    ``SeedSequence`` reads it when given no seed), never from the estimator's
    ``seed`` -- noise that can be replayed can be subtracted. Make one per fit and
    draw every step's noise from it.

    For tests only, an integer in the environment variable ``SPARKGD_TESTING_DP_SEED``
    seeds it so a run reproduces; the noise is then known to whoever knows that number
    and the fit is not private (a RuntimeWarning says so).
    """
    seed = os.environ.get(SEED_ENV)
    if not seed:
        return np.random.default_rng()
    warnings.warn(f"{SEED_ENV} is set: DP noise is reproducible, the fit is NOT private",
                  RuntimeWarning, stacklevel=2)
    return np.random.default_rng(int(seed))


def noise(shape, sigma, C, rng=None):
    """Gaussian noise N(0, (sigma C)^2) of ``shape`` for a clipped gradient sum.

    ``rng``: the fit's :func:`noise_generator` (None makes a fresh one). A generator
    seeded any other way makes the noise replayable: tests only.
    """
    if rng is None:
        rng = noise_generator()
    return rng.normal(0.0, sigma * C, size=shape)


def dp_step_gradient(clipped_grad_sum, noise, expected_batch):
    """One step's private gradient estimate, ``(clipped sum + noise) / (q n)``.

    ``clipped_grad_sum`` is the gradient part of :func:`clipped_sums` (``sums[2:]``)
    summed over the sample. It is divided by the *expected* batch size ``q n`` (n
    the number of rows, public as in DP-SGD generally), not the realized one: how many
    rows were drawn depends on the data and is not covered by the noise. The penalty's
    gradient is added after this: it depends on theta alone, not on the data.
    """
    if not expected_batch > 0:
        raise ValueError(f"expected batch size must be > 0 (got {expected_batch})")
    return (np.asarray(clipped_grad_sum) + noise) / expected_batch
