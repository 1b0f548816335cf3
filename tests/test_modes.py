"""Update modes (issue 13): local SGD (model averaging) and the parameter server with
stale synchronous parallel -- the arithmetic against NumPy, the protocol in threads
(the hub and real serving loops, no Spark), then the estimators on Spark."""
import socket
import threading
import time

import numpy as np
import pytest

from sparkgd import kernels
from sparkgd.engine import wire
from sparkgd.errors import SparkgdError
from sparkgd.modes import local, ps
from sparkgd.penalties import Penalty, soft_threshold
from sparkgd.stats import Preconditioner

from test_topology import D, Tasks

# ------------------------------------------------------------------ pure


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def numpy_local_round(X, y, w, theta, steps, lr, reg, enet, std=None, round_no=1):
    """localSteps of sgd on one task's rows, written out: steps in the standardized
    space u = beta * std when ``std`` is given, L2 in the gradient, L1 prox each step."""
    d = X.shape[1]
    scale = np.ones(d) if std is None else 1.0 / std        # beta = u * scale
    u = np.concatenate([theta[:d] / scale, theta[d:]])
    l2 = reg * (1 - enet) * (np.ones(d) if std is None else std ** 2)
    l1_u = reg * enet * (np.ones(d) if std is None else std) * scale
    W = w.sum()
    for s in range(steps):
        t = (round_no - 1) * steps + s + 1
        beta, b = u[:d] * scale, u[d]
        r = w * (_sigmoid(X @ beta + b) - y)
        g_beta = X.T @ r / W + l2 * beta
        g_b = r.sum() / W
        step = lr / np.sqrt(t)
        u = u - step * np.concatenate([g_beta * scale, [g_b]])
        u[:d] = soft_threshold(u[:d], step * l1_u)
    end = np.concatenate([u[:d] * scale, u[d:]])
    z = X @ theta[:d] + theta[d]
    loss = w @ (np.logaddexp(0, z) - y * z)
    return np.concatenate([[loss, W], W * (end - theta)])


@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("round_no", [1, 3])
def test_a_local_round_is_local_steps_of_sgd_on_the_tasks_own_rows(standardize, round_no):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 6)) * [1, 2, 3, 0.5, 1, 4]
    y = (rng.random(80) < 0.5).astype(float)
    w = rng.uniform(0.5, 2.0, size=80)
    theta = rng.normal(size=7) * 0.1
    std = X.std(axis=0) if standardize else None
    work = local.Work("sgd", 0.3, 5, 1.0, 0, reg_param=0.05, elastic_net_param=0.5, std=std)
    layout = kernels.Layout(6, 1, True)
    got = local.round_sums([(X[:50], y[:50], w[:50]), (X[50:], y[50:], w[50:])], theta,
                           kernels.make_loss("logistic"), layout, work, round_no, 0)
    want = numpy_local_round(X, y, w, theta, 5, 0.3, 0.05, 0.5, std, round_no)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_work_travels_as_json_and_refuses_a_scale_of_the_wrong_width():
    import json

    work = local.Work("adam", None, 7, 0.25, 3, 0.1, 0.2, np.array([1.0, 2.5, 1e-300]))
    config = json.loads(json.dumps(work.to_config()))
    back = local.Work.from_config(config, 3)
    assert (back.optimizer, back.step_size, back.local_steps, back.fraction, back.seed) == \
        ("adam", None, 7, 0.25, 3)
    assert np.array_equal(back.std, work.std)
    with pytest.raises(ValueError, match="3 values for 4 features"):
        local.Work.from_config(config, 4)
    with pytest.raises(ValueError, match="not a local round"):
        local.Work.from_config(dict(config, optimizer="lbfgs"), 3)


def test_a_local_round_on_a_mini_batch_starts_from_the_full_loss():
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(300, 4)), (rng.random(300) < 0.5).astype(float)
    layout, loss = kernels.Layout(4, 1, True), kernels.make_loss("logistic")
    theta = rng.normal(size=5)
    work = local.Work("momentum", 0.05, 3, 0.2, 9)
    got = local.round_sums([(X, y, None)], theta, loss, layout, work, 2, 1)
    full = kernels.partition_sums([(X, y, None)], theta, loss, layout)
    np.testing.assert_allclose(got[:2], full[:2], rtol=1e-12)
    np.testing.assert_allclose(kernels.partition_loss([(X, y, None)], theta, loss, layout),
                               full[:2], rtol=1e-12)
    assert np.all(np.isfinite(got[2:])) and np.any(got[2:] != 0)


def test_pushes_of_one_clock_at_staleness_zero_add_up_to_sync_sgds_step():
    rng = np.random.default_rng(2)
    layout = kernels.Layout(5, 1, True)
    penalty = Penalty(layout, 0.1, 0.3)
    theta0 = rng.normal(size=6)
    parts = [np.concatenate([[1.0 + i, 10.0 + i], rng.normal(size=6)]) for i in range(3)]
    W = sum(p[1] for p in parts)
    server = ps.Server(theta0, W, penalty, step_size=0.4, staleness=0)
    for i, part in enumerate(parts):
        server.sample(i, 1)
        server.push(i, 1, part, theta0, 0.01)
    server.clock_done(1)
    total = sum(parts)
    g = total[2:] / W + penalty.l2_weights * theta0
    want = soft_threshold(theta0 - 0.4 * g, 0.4 * penalty.l1_weights)
    np.testing.assert_allclose(server.theta(), want, rtol=1e-13, atol=1e-15)
    f0 = total[0] / W + 0.5 * (penalty.l2_weights * theta0) @ theta0 + \
        penalty.l1_weights @ np.abs(theta0)
    assert server.reported[1] == pytest.approx(f0, rel=1e-13)


def test_the_server_gives_a_slow_task_a_smaller_batch_only_when_balancing():
    layout = kernels.Layout(2, 1, False)
    for staleness, want in ((1, 1 / 3), (0, 1.0)):
        server = ps.Server(np.zeros(2), 30.0, Penalty(layout), staleness=staleness)
        for i, seconds in enumerate([1.0, 1.0, 3.0]):
            server.sample(i, 1)
            server.push(i, 1, np.array([0.0, 10.0, 0.0, 0.0]), np.zeros(2), seconds)
        assert server.sample(2, 2)[0] == pytest.approx(want)
        assert server.sample(0, 2)[0] == 1.0


# ------------------------------------------------------------------ the protocol in threads

CLOCKS, LR = 6, 0.5


def numpy_sync_sgd(tasks, clocks=CLOCKS, lr=LR):
    """Sync sgd on every task's rows, written out (no penalty)."""
    loss = kernels.make_loss("logistic")
    theta = np.zeros(D + 1)
    for t in range(1, clocks + 1):
        total = tasks.reference(theta)
        theta = theta - lr / np.sqrt(t) * total[2:] / total[1]
    return theta


def new_server(tasks, staleness, **kw):
    every = [b for bl in tasks.blocks for b in bl]
    W = sum(b[2].sum() for b in every)
    return ps.Server(np.zeros(D + 1), W, Penalty(tasks.layout), step_size=LR, tol=0.0,
                     staleness=staleness, **kw)


def test_async_at_staleness_zero_is_sync_sgd():
    tasks = Tasks(4, "star")
    try:
        server = new_server(tasks, 0)
        run = tasks.hub.run_async(server, 0, CLOCKS)
    finally:
        tasks.close()
    assert run.done == CLOCKS and run.clocks == [CLOCKS] * 4 and server.pushes == 4 * CLOCKS
    np.testing.assert_allclose(server.theta(), numpy_sync_sgd(tasks), rtol=1e-12, atol=1e-14)
    assert tasks.hub.rejected_pushes == 0


def test_no_task_runs_more_than_staleness_clocks_ahead_of_the_slowest():
    """Task 1 is four times slower: the others run ahead, by at most ``s`` clocks."""
    s = 2
    tasks = Tasks(3, "star")
    tasks.hub.configure(dict(tasks.config, slow=[1, 4.0]))
    leads = []
    try:
        server = new_server(tasks, s)
        sample = server.sample

        def watched(i, clock):
            clocks = tasks.hub._ssp.clocks
            leads.append((clock - 1) - min(clocks))
            return sample(i, clock)

        server.sample = watched
        run = tasks.hub.run_async(server, s, 12)
    finally:
        tasks.close()
    assert run.clocks == [12, 12, 12]
    # exact on purpose: task 1 is 4x slower, so the others gain a clock on it every
    # ~1.3 of theirs and reach the bound s = 2 within the first 3 of 12 clocks, however
    # busy the machine (slowness is a multiple of the task's own pass time); the hub
    # then holds them there
    assert max(leads) == s          # they did run ahead, and no further
    assert server.pushes == 36


def test_a_duplicated_push_is_counted_and_never_applied(monkeypatch):
    """Task 2 sends its pushes twice (a valid frame each time; not the last clock's,
    which could arrive after the run): the second is dropped and counted; the result is
    sync's."""
    from sparkgd.engine import task

    star = task._star

    def twice(state, chan, links, frame, compute):
        star(state, chan, links, frame, compute)
        if state.index == 2 and frame.iteration < CLOCKS - 1:
            star(state, chan, links, frame, compute)

    monkeypatch.setitem(task.PASSES, "star", twice)
    tasks = Tasks(3, "star")
    try:
        server = new_server(tasks, 0)
        tasks.hub.run_async(server, 0, CLOCKS)
    finally:
        tasks.close()
    assert tasks.hub.rejected_pushes == CLOCKS - 1
    assert server.pushes == 3 * CLOCKS
    np.testing.assert_allclose(server.theta(), numpy_sync_sgd(tasks), rtol=1e-12, atol=1e-14)


def test_a_replayed_push_drops_the_connection_and_is_never_applied(monkeypatch):
    """Task 1 replays the bytes of its first push later on the same connection: the
    frame's sequence number (its GCM nonce) gives it away, the hub drops the connection (counted), and
    the task's next attempt is asked again at its clock; nothing is applied twice."""
    sent = {}
    real = wire.send_parts

    def recording(sock, parts, patient=None):
        views = [bytes(memoryview(p).cast("B")) for p in parts]
        op = views[0][0] if len(views[0]) == wire.PREFIX_BYTES else None   # the clear op
        me = threading.current_thread().name
        if op == wire.OP_REPLY and me == "task-1":
            if "first" not in sent:
                sent["first"] = views
            elif not sent.get("replayed"):
                sent["replayed"] = True
                real(sock, sent["first"], patient)      # the replay, then the real push
        return real(sock, parts, patient)

    monkeypatch.setattr(wire, "send_parts", recording)
    tasks = Tasks(3, "star", names=True)
    try:
        server = new_server(tasks, 1)
        rejected = tasks.hub.rejected

        def retry():
            time.sleep(0.3)
            tasks.spawn(1)
        threading.Thread(target=retry, daemon=True).start()
        run = tasks.hub.run_async(server, 1, CLOCKS)
    finally:
        tasks.close(lost=[1])
    assert sent.get("replayed")
    assert tasks.hub.rejected == rejected + 1
    assert run.clocks == [CLOCKS] * 3 and server.pushes == 3 * CLOCKS


@pytest.mark.parametrize("staleness", [0, 1])
def test_a_lost_task_rejoins_and_is_asked_again_at_its_clock(staleness):
    """Task 2 is lost right after its second push and its retry connects; at staleness 0
    the clock in flight is computed at one theta all the same: sync's model."""
    tasks = Tasks(3, "star", names=True)
    try:
        server = new_server(tasks, staleness)
        pushed = server.push

        def push(i, clock, *rest):
            pushed(i, clock, *rest)
            if i == 2 and clock == 2:
                tasks.hub._tasks[2].sock.shutdown(socket.SHUT_RDWR)   # task 2 is lost
                threading.Timer(0.2, tasks.spawn, args=(2,)).start()    # its retry

        server.push = push
        run = tasks.hub.run_async(server, staleness, CLOCKS)
    finally:
        tasks.close(lost=[2])
    assert run.clocks == [CLOCKS] * 3 and server.pushes == 3 * CLOCKS
    assert tasks.hub.reconnects == 1
    if staleness == 0:
        np.testing.assert_allclose(server.theta(), numpy_sync_sgd(tasks), rtol=1e-12,
                                   atol=1e-14)


def test_a_redone_run_undoes_the_pushes_beyond_the_last_whole_clock():
    """A run cut short (a fallback, a rebuild) starts again from the last clock every
    task completed: what later pushes moved is undone first."""
    layout = kernels.Layout(3, 1, False)
    server = ps.Server(np.zeros(3), 20.0, Penalty(layout, 0.1), step_size=0.5, staleness=1,
                       task_weights=[10.0, 10.0])
    rng = np.random.default_rng(5)
    push = [np.concatenate([[1.0, 10.0], rng.normal(size=3)]) for _ in range(4)]
    for i, clock, k in ((0, 1, 0), (1, 1, 1)):
        server.sample(i, clock)
        server.push(i, clock, push[k], server.theta(), 0.1)
    server.clock_done(1)
    after_one = server.theta()
    server.sample(0, 2)
    server.push(0, 2, push[2], after_one, 0.1)     # clock 2: task 0 only, then cut short
    assert not np.allclose(server.theta(), after_one)
    server.abandon_partial()
    np.testing.assert_allclose(server.theta(), after_one, rtol=1e-15, atol=1e-15)
    assert 2 not in server.reported


# ------------------------------------------------------------------ on Spark


@pytest.fixture(scope="module")
def data(spark):
    from conftest import logistic_data, to_df

    X, y, w = logistic_data(n=1200, d=6, seed=4, weights=True)
    df = to_df(spark, X, y, w, partitions=4).cache()
    df.count()
    return df


@pytest.mark.parametrize("fraction", [1.0, 0.4])
def test_async_staleness_zero_equals_sync_on_spark(data, fraction):
    from sparkgd import LogisticRegression

    common = dict(weightCol="weight", optimizer="sgd", stepSize=0.3, maxIter=40, tol=0,
                  regParam=0.01, elasticNetParam=0.3, standardization=True,
                  miniBatchFraction=fraction)
    a = LogisticRegression(**common).fit(data)
    b = LogisticRegression(mode="async", staleness=0, **common).fit(data)
    np.testing.assert_allclose(b.coefficients, a.coefficients, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(b.summary.objectiveHistory, a.summary.objectiveHistory,
                               rtol=1e-10)
    assert b.summary.mode == "async" and b.summary.totalIterations == 40
    assert len(b.summary.objectiveTimes) == 40 and b.summary.rejectedPushes == 0
    assert len(b.summary.taskTimeSkew) >= 39 and sum(b.summary.rowsPerTask) == 1200


def test_local_and_async_sgd_get_near_the_optimum(data):
    """300 iterations of sgd at step 0.3 (its step decays as 0.3 / sqrt(t)): local SGD
    takes localSteps times as many steps and gets within 1e-2 of F*; async tracks sync
    sgd iteration for iteration (3.5e-2 here for both: it is sync's schedule)."""
    from sparkgd import LogisticRegression

    best = LogisticRegression(weightCol="weight", regParam=0.01, tol=1e-12).fit(data)
    f_opt = best.summary.objectiveHistory[-1]
    gaps = {}
    for name, extra in (("sync", {}), ("local", dict(mode="local", localSteps=5)),
                        ("local batch", dict(mode="local", localSteps=4,
                                             miniBatchFraction=0.3)),
                        ("async", dict(mode="async", staleness=3))):
        s = LogisticRegression(weightCol="weight", regParam=0.01, optimizer="sgd",
                               stepSize=0.3, maxIter=300, tol=0, **extra).fit(data).summary
        assert s.totalIterations == 300 and len(s.objectiveHistory) == 300, name
        assert len(s.objectiveTimes) == 300 and s.objectiveTimes == sorted(s.objectiveTimes)
        gaps[name] = (s.objectiveHistory[-1] - f_opt) / f_opt
    assert gaps["local"] < 1e-2 and gaps["local batch"] < 1e-2, gaps
    assert 0 < gaps["async"] < 1.05 * gaps["sync"], gaps


def test_local_with_l1_gives_exact_zeros(data):
    from sparkgd import LogisticRegression

    m = LogisticRegression(weightCol="weight", regParam=0.05, elasticNetParam=1.0,
                           optimizer="adam", stepSize=0.05, mode="local", localSteps=5,
                           maxIter=60, tol=0).fit(data)
    assert np.sum(m.coefficients == 0) >= 1
    assert np.all(np.isfinite(m.coefficients))


def test_a_slowed_task_shows_in_the_skew(spark, data):
    from sparkgd import LogisticRegression
    from sparkgd.engine.jobs import SLOW_TASK_CONF

    spark.conf.set(SLOW_TASK_CONF, "1:6")
    try:
        s = LogisticRegression(weightCol="weight", optimizer="sgd", maxIter=8, tol=0,
                               topology="star").fit(data).summary
    finally:
        spark.conf.unset(SLOW_TASK_CONF)
    # two tasks, one six times slower: slowest / median = 6 / 3.5 nominally
    assert len(s.taskTimeSkew) >= 8 and np.median(s.taskTimeSkew) > 1.3


@pytest.mark.parametrize("params, message", [
    (dict(mode="bulk"), "unknown mode 'bulk'"),
    (dict(mode="async"), "mode async applies each push as an sgd step"),
    (dict(mode="local", optimizer="gd"), "mode local takes steps of a first-order"),
    (dict(mode="local", optimizer="sgd", localSteps=0), "localSteps must be >= 1"),
    (dict(mode="async", optimizer="sgd", staleness=-1), "staleness must be >= 0"),
])
def test_mode_params_are_checked_up_front(params, message):
    from sparkgd import LinearRegression

    with pytest.raises(SparkgdError, match=message):
        LinearRegression(**params)._validate()


def test_local_and_async_give_the_same_over_serving_tasks_and_over_one_job_per_pass(data):
    """The file store's serving tasks, and one Spark job per pass (where async has no
    tasks to run ahead: each clock is bulk-synchronous), on the same blocks."""
    from sparkgd import coordinator, work
    from sparkgd.data import resolve_input
    from sparkgd.engine import Engine
    from sparkgd.modes import Keep, Problem, sync

    spec = resolve_input(data.schema, weight_col="weight")
    loss = kernels.make_loss("logistic")
    out, kinds = [], []
    for per_pass in ("auto", "jobs"):
        with Engine.open(data, spec, store="files", per_pass=per_pass,
                         parse_work=work.parse) as engine:
            kinds.append(engine.kind)
            layout = kernels.Layout(engine.facts.num_features, 1, True)
            penalty = Penalty(layout, 0.01, 0.2)
            x0 = np.zeros(layout.size)
            weight = sum(i["wsum"] for i in engine.facts.infos)
            problem = Problem(loss, layout, penalty, x0, weight=weight)
            plan = coordinator.Plan(model="logistic", spec=spec, optimizer="sgd",
                                    step_size=0.3, max_iter=8, tol=0, local_steps=3,
                                    reg_param=0.01, elastic_net_param=0.2, staleness=0)
            a = local.fit(engine, problem, plan, Keep())
            b = ps.fit(engine, problem, plan, Keep())
            c = sync.fit(engine, problem, plan, Keep())
            out.append((a, b, c))
    assert kinds == ["workers", "jobs"]
    for (a, b, c) in out:
        np.testing.assert_allclose(b.theta, c.theta, rtol=1e-10, atol=1e-13)   # s=0 is sync
        np.testing.assert_allclose(b.objective_history, c.objective_history, rtol=1e-10)
    np.testing.assert_allclose(out[0][0].theta, out[1][0].theta, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(out[0][0].objective_history, out[1][0].objective_history,
                               rtol=1e-10)


def test_a_lighter_push_computes_the_drawn_row_chunks_and_copies_nothing(monkeypatch):
    rng = np.random.default_rng(6)
    monkeypatch.setattr(kernels, "CHUNK_BYTES", 2048)     # 2048 B = 64 rows of 4 floats
    X, y = rng.normal(size=(1000, 4)), (rng.random(1000) < 0.5).astype(float)
    layout, loss = kernels.Layout(4, 1, True), kernels.make_loss("logistic")
    theta = rng.normal(size=5)
    pieces = kernels.row_chunks(X, y, None)
    assert len(pieces) == 4 and all(np.shares_memory(p[0], X) for p in pieces)
    kept = kernels.keep_chunks(len(pieces), 0.5, 7, 3, 1)
    want = sum(kernels.block_sums(*p, theta, loss, layout) for p, k in zip(pieces, kept) if k)
    got = kernels.partition_sums([(X, y, None)], theta, loss, layout, chunks=(0.5, 7, 3, 1))
    assert 0 < kept.sum() < 4
    np.testing.assert_allclose(got, want, rtol=1e-13)
