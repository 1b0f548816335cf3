"""Optimizers on plain NumPy objectives: no Spark needed."""
import math

import numpy as np
import pytest
from scipy.optimize import minimize as scipy_minimize

from sparkgd import optim


def quadratic(seed=0, d=6):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(3 * d, d))
    H = A.T @ A / (3 * d) + 0.1 * np.eye(d)
    b = rng.normal(size=d)

    def fun(x):
        return 0.5 * x @ H @ x - b @ x, H @ x - b

    x_star = np.linalg.solve(H, b)
    return fun, x_star, fun(x_star)[0], H


def logistic(seed=0, n=300, d=5, reg=0.01):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = (rng.random(n) < 1 / (1 + np.exp(-X @ rng.normal(size=d)))).astype(float)

    def fun(x):
        z = X @ x
        p = 1 / (1 + np.exp(-z))
        return (np.mean(np.logaddexp(0, z) - y * z) + 0.5 * reg * x @ x,
                X.T @ (p - y) / n + reg * x)

    ref = scipy_minimize(fun, np.zeros(d), jac=True, method="L-BFGS-B",
                         options={"ftol": 1e-15, "gtol": 1e-13, "maxiter": 10000})
    return fun, ref.x, ref.fun


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
@pytest.mark.parametrize("problem", ["quadratic", "logistic"])
def test_every_optimizer_converges(name, problem):
    if problem == "quadratic":
        fun, x_star, f_star, _ = quadratic()
    else:
        fun, x_star, f_star = logistic()
    d = x_star.shape[0]
    res = optim.minimize(name, fun, np.zeros(d), max_iter=2000, tol=1e-12)
    # sgd's stepSize/sqrt(t) schedule is slow by design; everything else gets close
    bound = 1e-6 if name == "sgd" else 1e-9
    assert abs(res.fun - f_star) <= bound * max(1.0, abs(f_star))
    assert res.history[-1] == res.fun
    assert len(res.history) == res.iterations


def test_line_searches_decrease_the_objective():
    from sparkgd.optim.gd import MEMORY

    fun, _, _ = logistic(seed=2)
    h = optim.minimize("lbfgs", fun, np.zeros(5), max_iter=50, tol=0).history
    assert all(b <= a + 1e-15 for a, b in zip(h, h[1:]))
    f0 = fun(np.zeros(5))[0]
    h = [f0] + optim.minimize("gd", fun, np.zeros(5), max_iter=50, tol=0).history
    # non-monotone Armijo: never above the largest of the last MEMORY values
    assert all(h[i] <= max(h[max(0, i - MEMORY):i]) for i in range(1, len(h)))


def test_gd_fixed_step_reproduces_the_textbook_iteration():
    fun, _, _, H = quadratic(seed=1)
    x = np.zeros(H.shape[0])
    expected = []
    for _ in range(7):
        x = x - 0.3 * fun(x)[1]
        expected.append(fun(x)[0])
    res = optim.minimize("gd", fun, np.zeros(H.shape[0]), max_iter=7, tol=0, step_size=0.3)
    np.testing.assert_allclose(res.x, x, rtol=0, atol=0)
    assert res.history == expected and res.iterations == 7


def test_tol_is_relative_change_of_the_objective():
    fun, _, _ = logistic(seed=3)
    res = optim.minimize("gd", fun, np.zeros(5), max_iter=1000, tol=1e-4, step_size=0.5)
    h = res.history
    assert optim.converged(h[-2], h[-1], 1e-4)
    assert not any(optim.converged(a, b, 1e-4) for a, b in zip(h[:-2], h[1:-1]))


def test_max_iter_zero_returns_the_start():
    fun, _, _, H = quadratic()
    for name in optim.OPTIMIZERS:
        res = optim.minimize(name, fun, np.zeros(H.shape[0]), max_iter=0)
        assert res.iterations == 0 and res.history == [0.0]


def test_callback_sees_every_iteration():
    fun, _, _, H = quadratic()
    seen = []
    res = optim.minimize("lbfgs", fun, np.zeros(H.shape[0]), max_iter=100, tol=1e-10,
                         callback=lambda it, f, gn, st: seen.append((it, f)))
    assert [s[0] for s in seen] == list(range(1, len(seen) + 1))
    assert [s[1] for s in seen] == res.history[: len(seen)]


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="unknown optimizer"):
        optim.minimize("newton", lambda x: (0.0, x), np.zeros(2))


def lasso(seed=0, n=200, d=8, lam=0.05):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = X[:, :3] @ np.array([1.5, -2.0, 0.7]) + 0.1 * rng.normal(size=n)

    def fun(x):
        r = X @ x - y
        return 0.5 * r @ r / n, X.T @ r / n

    # independent reference: coordinate descent, run to machine precision
    x = np.zeros(d)
    col = (X * X).sum(axis=0) / n
    for _ in range(5000):
        for j in range(d):
            r = y - X @ x + X[:, j] * x[j]
            rho = X[:, j] @ r / n
            x[j] = np.sign(rho) * max(abs(rho) - lam, 0.0) / col[j]
    f_star = fun(x)[0] + lam * np.abs(x).sum()
    return fun, lam * np.ones(d), x, f_star


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_l1_gives_the_exact_zeros_of_coordinate_descent(name):
    fun, l1, x_star, f_star = lasso()
    step = {"sgd": 0.5, "momentum": 0.05, "nesterov": 0.05, "adam": 0.01}.get(name)
    res = optim.minimize(name, fun, np.zeros(8), max_iter=3000, tol=1e-14, l1=l1,
                         step_size=step)
    assert abs(res.fun - f_star) <= (1e-6 if name == "sgd" else 1e-9) * f_star
    assert res.history[-1] == res.fun
    zeros = x_star == 0
    assert zeros.sum() >= 3
    if name != "sgd":  # sgd's shrinking steps leave tiny values on the last few coords
        np.testing.assert_array_equal(res.x == 0, zeros)


def test_optimizer_state_is_plain_values():
    from sparkgd.optim import first_order

    for name in ("sgd", "momentum", "nesterov", "adam"):
        opt = first_order.make(name)
        state = opt.init(np.zeros(3))
        _, state, _ = opt.update(np.ones(3), state)
        for v in state:
            assert isinstance(v, (int, np.ndarray))


def test_callback_reports_the_step_actually_taken():
    fun, _, _, H = quadratic()
    xs, steps = [np.zeros(H.shape[0])], []

    def fun_tracking(x):
        return fun(x)

    res = optim.minimize("lbfgs", fun_tracking, np.zeros(H.shape[0]), max_iter=5, tol=0,
                         callback=lambda it, f, gn, st: steps.append(st))
    assert len(steps) == res.iterations and all(s > 0 for s in steps)


@pytest.mark.parametrize("name", ["gd", "sgd", "momentum", "nesterov", "adam"])
def test_tol_zero_runs_every_iteration(name):
    """DESIGN: ``tol=0`` runs all maxIter iterations -- even once F stops changing
    (here from the first step: the start is the optimum)."""
    fun, x_star, f_star, _ = quadratic()
    res = optim.minimize(name, fun, x_star, max_iter=25, tol=0.0, step_size=0.01)
    assert res.iterations == 25 and len(res.history) >= 25
    assert not res.converged


def test_gd_line_search_with_compressed_gradients():
    """Top-k gradients with error feedback (F exact), no step size: the exact-gradient
    rules stop percent above the optimum (BB steps from compression noise, a direction
    that is not downhill); inexact ones get within 1e-3 in 1,000 iterations, as the
    issue asks; qsgd and fp16 stop on their own, close. Measured (issue 29): top-k
    8.8e-4 (the issue's 1e-3 is the bound), qsgd:8 2.3e-6, fp16 1.2e-5 relative above the
    optimum (exact gradients through the same search: 1.1e-5); the bounds are 4x those."""
    from scipy.optimize import minimize as sp_minimize

    from sparkgd import codecs
    from sparkgd.optim.gd import minimize_gd

    rng = np.random.default_rng(0)
    n, d = 4000, 30
    X = np.c_[rng.normal(size=(n, d)), np.ones(n)]
    y = (X[:, :d] @ rng.normal(size=d) + rng.normal(size=n) > 0).astype(float)
    parts = np.array_split(np.arange(n), 2)

    def exact(t):
        z = X @ t
        return np.mean(np.logaddexp(0, z) - y * z), X.T @ (1 / (1 + np.exp(-z)) - y) / n

    best = sp_minimize(exact, np.zeros(d + 1), jac=True, method="L-BFGS-B",
                       options={"ftol": 0, "gtol": 1e-12}).fun

    def oracle(spec):
        codec, residual = codecs.parse(spec), [None, None]

        def fun(t):
            z = X @ t
            g = np.zeros(d + 1)
            for i, rows in enumerate(parts):      # two tasks, each its own residual
                part = X[rows].T @ (1 / (1 + np.exp(-z[rows])) - y[rows])
                data, residual[i] = codecs.encode(codec, part, residual[i], seed=(0, i))
                g += codecs.decode(codec, data, d + 1)
            return np.mean(np.logaddexp(0, z) - y * z), g / n
        return fun

    plain = minimize_gd(oracle("topk:0.1"), np.zeros(d + 1), max_iter=1000, tol=1e-6)
    assert (plain.fun - best) / best > 1e-2
    for spec, bound in (("topk:0.1", 1e-3), ("qsgd:8", 1e-5), ("fp16", 5e-5)):
        r = minimize_gd(oracle(spec), np.zeros(d + 1), max_iter=1000, tol=1e-6, inexact=True)
        assert (r.fun - best) / best <= bound, (spec, r.fun, best, r.message)


# ------------------------------------------------ first-order updates, written out


def textbook_path(name, fun, x0, lr, steps):
    """``steps`` iterations of ``name`` written from the textbooks (no sparkgd), as
    optim.first_order's table documents them -> (x after each step, F after each step):

    * sgd: ``x -= lr / sqrt(t) * g`` (t = 1, 2, ...);
    * momentum: PyTorch's ``torch.optim.SGD(momentum=mu, dampening=0)``, the heavy ball
      with the velocity summing raw gradients: ``v = mu v + g; x -= lr v``, v_0 = 0;
    * nesterov: PyTorch's ``nesterov=True`` (Sutskever et al. 2013 rewritten at the
      look-ahead point): ``v = mu v + g; x -= lr (g + mu v)``;
    * adam: Kingma & Ba (2015), Algorithm 1: ``m = b1 m + (1 - b1) g``,
      ``v = b2 v + (1 - b2) g^2``, ``m^ = m / (1 - b1^t)``, ``v^ = v / (1 - b2^t)``,
      ``x -= lr m^ / (sqrt(v^) + eps)``; b1 = 0.9, b2 = 0.999, eps = 1e-8;
    with mu = 0.9, the gradient taken at the current x before each step."""
    mu, b1, b2, eps = 0.9, 0.9, 0.999, 1e-8
    x = np.array(x0, dtype=float)
    vel, m, v = np.zeros_like(x), np.zeros_like(x), np.zeros_like(x)
    xs, fs = [], []
    _, g = fun(x)
    for t in range(1, steps + 1):
        if name == "sgd":
            x = x - lr / math.sqrt(t) * g
        elif name == "momentum":
            vel = mu * vel + g
            x = x - lr * vel
        elif name == "nesterov":
            vel = mu * vel + g
            x = x - lr * (g + mu * vel)
        else:
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            m_hat = m / (1 - b1 ** t)
            v_hat = v / (1 - b2 ** t)
            x = x - lr * m_hat / (np.sqrt(v_hat) + eps)
        f, g = fun(x)
        xs.append(x.copy())
        fs.append(f)
    return xs, fs


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adam"])
def test_first_order_steps_are_the_textbook_updates(name):
    """Each step of sgd, momentum, nesterov and adam against the update written out in
    :func:`textbook_path` (PyTorch's momentum and Nesterov, Kingma and Ba's Adam with bias
    correction), step by step on a fixed quadratic; the iterates differ enough between
    the four (and from a momentum of 0.8, or Adam without bias correction) that a
    changed coefficient or convention shows at the first steps."""
    fun, _, _, H = quadratic(seed=4)
    x0 = np.linspace(-1.0, 1.0, H.shape[0])
    lr = {"sgd": 0.3, "momentum": 0.1, "nesterov": 0.1, "adam": 0.05}[name]
    want_x, want_f = textbook_path(name, fun, x0, lr, 6)
    for k in range(1, 7):
        res = optim.minimize(name, fun, x0, max_iter=k, tol=0, step_size=lr)
        assert res.iterations == k
        np.testing.assert_allclose(res.x, want_x[k - 1], rtol=1e-12, atol=1e-15,
                                   err_msg=f"{name}, step {k}")
    np.testing.assert_allclose(res.history, want_f, rtol=1e-12)
    # the test can tell: the first steps of another convention are far from these
    other = {"sgd": "momentum", "momentum": "nesterov", "nesterov": "momentum",
             "adam": "sgd"}[name]
    assert np.abs(textbook_path(other, fun, x0, lr, 3)[0][2] - want_x[2]).max() > 1e-3


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adam"])
def test_first_order_defaults_are_the_documented_ones(name):
    """Without a stepSize, the table's default (momentum and nesterov 0.1, adam 0.01;
    sgd 1.0) with mu = 0.9 and Adam's 0.9 / 0.999 / 1e-8 -- the textbook path above at
    the default step."""
    fun, _, _, H = quadratic(seed=5)
    x0 = np.linspace(1.0, -1.0, H.shape[0])
    default = {"sgd": 1.0, "momentum": 0.1, "nesterov": 0.1, "adam": 0.01}[name]
    want_x, _ = textbook_path(name, fun, x0, default, 4)
    res = optim.minimize(name, fun, x0, max_iter=4, tol=0)
    np.testing.assert_allclose(res.x, want_x[-1], rtol=1e-12, atol=1e-15)
