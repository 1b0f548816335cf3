"""Topologies (issue 12): who talks to whom (pure), and real serving loops in threads --
the hub, :func:`sparkgd.engine.task.serve` and the links between tasks, without Spark --
checked against one NumPy sum of the same blocks."""
import math
import socket
import threading
import time

import numpy as np
import pytest

from sparkgd import codecs, kernels
from sparkgd.comm import tree_levels
from sparkgd.engine import collective as co
from sparkgd.engine import peers, task, wire
from sparkgd.engine.hub import Hub

# ------------------------------------------------------------------ pure


@pytest.mark.parametrize("p", [1, 2, 3, 7, 8, 16, 100])
@pytest.mark.parametrize("depth", [2, 3])
def test_the_tree_spans_every_task_once_with_treeaggregates_fan_in(p, depth):
    f = co.fan_in(p, depth)
    assert f == max(math.ceil(p ** (1 / depth)), 2)
    kids = [co.tree_children(i, p, f) for i in range(p)]
    flat = sorted(j for k in kids for j in k)
    assert flat == list(range(1, p))                      # every task but 0 once
    for i in range(1, p):
        assert i in kids[co.tree_parent(i, f)]
    assert all(len(k) <= f for k in kids)
    # hops to task 0: about depth (a heap of fan-in ceil(P^(1/depth)))
    assert co.tree_height(p, f) <= depth + (1 if p > f ** depth else 0)
    assert len(tree_levels(max(p, 1), depth)) <= depth + 1


@pytest.mark.parametrize("n,p", [(10, 3), (3, 8), (2001, 8), (1, 1)])
def test_ring_chunks_and_schedule(n, p):
    b = co.chunk_bounds(n, p)
    assert b == [0] + np.cumsum([len(c) for c in np.array_split(np.arange(n), p)]).tolist()
    for i in range(p):
        sent = {co.ring_send_chunk(i, s, p) for s in range(p - 1)}
        assert co.ring_final_chunk(i, p) not in sent and len(sent) == p - 1
    # chunk c is added along c, c+1, ..., c-1: every task once
    for c in range(p):
        holders = [(c + s) % p for s in range(p)]
        assert sorted(holders) == list(range(p))
        assert co.ring_final_chunk(holders[-1], p) == c


def test_theta_messages_full_and_delta_with_error_feedback():
    rng = np.random.default_rng(0)
    theta = rng.normal(size=50)
    data, held = co.pack_theta(theta, None, codecs.parse("fp16"))
    assert data[0] == co.THETA_FULL and np.array_equal(held, theta)
    assert np.array_equal(co.apply_theta(data, None, codecs.NONE, 50), theta)
    topk = codecs.parse("topk:0.1")
    held = np.zeros(50)
    task_held = held.copy()
    for _ in range(40):                 # the same theta again and again: what top-k left
        data, held = co.pack_theta(theta, held, topk)   # out goes next (driver's EF)
        task_held = co.apply_theta(data, task_held, topk, 50)
        assert np.array_equal(task_held, held)
        assert len(data) == 1 + topk.nbytes(50)
    np.testing.assert_allclose(held, theta, rtol=0, atol=1e-6 * np.abs(theta).max())
    with pytest.raises(codecs.CodecError, match="holds nothing"):
        co.apply_theta(data, None, topk, 50)
    with pytest.raises(codecs.CodecError):
        co.apply_theta(b"\x00" + bytes(7), None, codecs.NONE, 50)


def test_pass_bytes_by_topology():
    n, p, none = 2000, 8, codecs.NONE
    star = co.pass_bytes("star", p, n, none)
    tree = co.pass_bytes("tree", p, n, none)
    ring = co.pass_bytes("ring", p, n, none)
    assert star == {"driver_out": p * (1 + 8 * n), "driver_in": p * (16 + 8 * n), "peers": 0}
    assert tree == {"driver_out": 1 + 8 * n, "driver_in": 16 + 8 * n,
                    "peers": (p - 1) * (1 + 8 * n + 16 + 8 * n)}
    assert ring == {"driver_out": p + 8 * n, "driver_in": 16 + 8 * n,
                    "peers": (p - 1) * (p + 8 * n + 16 + 8 * n)}
    for topo in ("tree", "ring"):                      # the bound: <= 1/3 of star's
        t = co.pass_bytes(topo, p, n, none)
        assert t["driver_out"] + t["driver_in"] <= (star["driver_out"] + star["driver_in"]) / 3
    total = {c: sum(co.pass_bytes("tree", p, n, codecs.parse(c)).values())
             for c in ("none", "fp16", "topk:0.01")}
    assert total["fp16"] <= 0.55 * total["none"]
    assert total["topk:0.01"] <= 0.05 * total["none"]


# ------------------------------------------------------------------ tasks in threads

D = 40


def blocks_for(p, rows=30, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(p):
        X = rng.normal(size=(rows + i, D))
        y = (rng.random(rows + i) < 0.5).astype(float)
        w = rng.uniform(0.5, 2.0, size=rows + i)
        out.append([(X, y, w)])
    return out


class Tasks:
    """P serving loops in threads around one hub (non-strict, like the file store)."""

    def __init__(self, p, topology, codec="none", theta_codec=None, depth=2, strict=False,
                 deadline=5.0, seed=0, patch=None, names=False):
        self.p, self.errors = p, []
        self.blocks = blocks_for(p, seed=seed)
        self.hub = Hub(p, 0, "127.0.0.1", self._ended, lambda: p, 5.0, strict=strict,
                       deadline=deadline)
        self.threads = []
        for i in range(p):
            self.spawn(i)
        self.hub.wait_for_tasks()
        self.layout = kernels.Layout(D, 1, True)
        self.codec = codecs.parse(codec)
        self.theta_codec = codecs.parse(theta_codec or "none")
        self.hub.set_topology(topology, depth)
        self.hub.expect(2 + self.layout.size, self.codec, self.theta_codec)
        self.config = {"loss": "logistic", "params": {}, "layout": [D, 1, True],
                       "compression": str(self.codec),
                       "theta_compression": str(self.theta_codec)}
        self.hub.configure(self.config)

    def spawn(self, i):
        """Task ``i``'s serving loop (again: its next attempt), in a thread ``task-i``."""
        t = threading.Thread(target=self._serve, args=(i,), name=f"task-{i}", daemon=True)
        t.start()
        self.threads.append(t)

    def _ended(self):
        if self.errors:
            raise RuntimeError(f"a task failed: {self.errors[0]!r}")

    def _serve(self, i):
        try:
            chan = wire.connect(("127.0.0.1", self.hub.port), self.hub.secret, i, 0)
            with chan.sock:
                task.serve(chan, self.blocks[i], i, 1, self.hub.secret)
        except BaseException as e:  # noqa: BLE001 - reported by the hub's wait
            import traceback

            self.errors.append(e)
            self.tracebacks = getattr(self, "tracebacks", []) + [traceback.format_exc()]

    def total(self, theta):
        return co_sum(self.hub.evaluate(theta))

    def reference(self, theta):
        return numpy_logistic_sums([b for bl in self.blocks for b in bl], theta)

    def close(self, lost=()):
        """Stop every task; none may have failed (``lost``: whose connections a test
        broke -- those may end with a socket error)."""
        self.hub.close()
        for t in self.threads:
            t.join(5)
        errors = [e for e in self.errors if not (lost and isinstance(e, OSError))]
        assert not errors, getattr(self, "tracebacks", self.errors)


def hub_skews(tasks, seconds=5.0):
    """The hub's per-pass skews once every task's time is in (a tree's other tasks
    send theirs after the pass, and the hub reads them while it waits)."""
    from sparkgd.engine.hub import skews

    deadline = time.monotonic() + seconds
    while True:
        got = skews(tasks.hub.task_seconds, tasks.p)
        if len(got) == len(tasks.hub.task_seconds) or time.monotonic() > deadline:
            return got
        end = time.monotonic() + 0.05
        tasks.hub._wait(lambda: time.monotonic() < end)


def numpy_logistic_sums(blocks, theta):
    """``[loss_sum, weight_sum, grad (D + 1)]`` of the weighted logistic loss over
    ``blocks``, written out in NumPy (not sparkgd's kernels): ``z = X beta + b``,
    ``loss_i = log(1 + e^z_i) - y_i z_i``, ``r_i = w_i (sigmoid(z_i) - y_i)``, the gradient
    ``[X^T r, sum r]``."""
    beta, b = theta[:-1], theta[-1]
    out = np.zeros(theta.size + 2)
    for X, y, w in blocks:
        z = X @ beta + b
        r = w * (1.0 / (1.0 + np.exp(-z)) - y)
        out[0] += w @ (np.logaddexp(0.0, z) - y * z)
        out[1] += w.sum()
        out[2:-1] += X.T @ r
        out[-1] += r.sum()
    return out


def co_sum(parts):
    total = np.array(parts[0], dtype=float)
    for part in parts[1:]:
        total += part
    return total


@pytest.mark.parametrize("topology", ["star", "tree", "ring"])
@pytest.mark.parametrize("p", [1, 2, 3, 8])
def test_every_topology_sums_like_numpy_with_exact_bytes(topology, p):
    tasks = Tasks(p, topology)
    theta = np.random.default_rng(1).normal(size=D + 1) * 0.1
    try:
        first = tasks.total(theta)
        bytes_ = tasks.hub.last_bytes
        frames = {i: p.conn.send_seq for i, p in tasks.hub._tasks.items()}
        again = tasks.total(theta)
        moved = {i for i, p in tasks.hub._tasks.items() if p.conn.send_seq != frames[i]}
        skews = hub_skews(tasks)
    finally:
        tasks.close()
    # the driver sends to every task (star, ring) or to task 0 alone (tree: the others
    # send it only a frame header with their time, no payload: see the bytes below)
    assert moved == ({0} if topology == "tree" else set(range(p)))
    assert len(skews) == 2 and all(s >= 1.0 for s in skews)    # every task timed
    want = tasks.reference(theta)
    np.testing.assert_allclose(first, want, rtol=1e-12, atol=1e-12)
    assert np.array_equal(first, again)                # a fixed order: bit for bit
    assert bytes_ == co.pass_bytes(topology, p, D + 1)
    assert tasks.hub.peer_failures == 0


#: Top-k passes at one theta whose mean is checked (error feedback: the mean tends to the
#: exact sums as 1 / passes).
TOPK_PASSES = 40


@pytest.mark.parametrize("codec", ["fp16", "topk:0.1", "qsgd:8"])
@pytest.mark.parametrize("topology", ["star", "tree", "ring"])
def test_compressed_links_count_what_crosses_them(topology, codec):
    """Every hop decodes, adds in float64 and encodes again; theta goes down as the
    encoded difference from what the tasks hold (in full the first time).

    How close to NumPy's sums (largest error over the largest sum; an all-zero total
    scores 1 and must fail): fp16 and qsgd:8 in one pass, measured 3.1e-4 and 2.4e-2 at
    worst over the topologies (bounds 1e-3 and 0.1). Top-k sends one value in ten a hop
    -- one pass is 0.94 to 1.2 off -- and keeps the rest in the tasks' residuals, so the
    mean of TOPK_PASSES passes at one theta is the exact total up to the residuals over
    TOPK_PASSES: measured 0.12 (star), 0.10 (tree), 0.17 (ring), bound 0.5; without
    the residuals the mean would stay at one pass's error, all zeros at 1."""
    p = 5
    tasks = Tasks(p, topology, codec, theta_codec=codec)
    rng = np.random.default_rng(2)
    c = codecs.parse(codec)
    try:
        theta = rng.normal(size=D + 1) * 0.1
        got = tasks.total(theta)
        assert tasks.hub.last_bytes == co.pass_bytes(topology, p, D + 1, c, delta=False)
        theta2 = theta + rng.normal(size=D + 1) * 1e-3
        passes = [tasks.total(theta2)]
        assert tasks.hub.last_bytes == co.pass_bytes(topology, p, D + 1, c, delta=True)
        if c.name == "topk":
            passes += [tasks.total(theta2) for _ in range(TOPK_PASSES - 1)]
    finally:
        tasks.close()
    want = tasks.reference(theta)
    assert got[0] == pytest.approx(want[0], rel=1e-12)     # the loss sum is never encoded
    assert got[1] == pytest.approx(want[1], rel=1e-12)

    def err(total, exact):
        return np.abs(total[2:] - exact[2:]).max() / np.abs(exact[2:]).max()

    if c.name == "topk":
        want2 = tasks.reference(theta2)
        mean = np.mean(passes, axis=0)
        assert err(mean, want2) <= 0.5, (err(mean, want2), err(passes[0], want2))
        assert np.count_nonzero(got[2:]) >= c.k(D + 1)       # what was sent is there
    else:
        bound = {"fp16": 1e-3, "qsgd:8": 0.1}[codec]
        assert err(got, want) <= bound, err(got, want)


def test_ring_and_tree_cut_the_drivers_bytes_to_a_third_of_stars_at_eight_tasks():
    driver = {}
    theta = np.zeros(D + 1)
    for topology in ("star", "tree", "ring"):
        tasks = Tasks(8, topology)
        try:
            tasks.total(theta)
        finally:
            tasks.close()
        b = tasks.hub.last_bytes
        driver[topology] = b["driver_out"] + b["driver_in"]
    assert driver["tree"] <= driver["star"] / 3 and driver["ring"] <= driver["star"] / 3


def test_a_broken_link_redoes_the_pass_and_persistent_failure_falls_back_to_star(
        monkeypatch):
    """Task 2 fails to link once: the hub hands out a new epoch and the pass is redone
    (same total). When links keep failing, the tasks send to the driver directly."""
    real = peers.Links.ensure
    failures = {"left": 1}

    def flaky(self):
        if self.index == 2 and failures["left"] > 0:
            failures["left"] -= 1
            raise peers.PeerError("task 2: injected link failure")
        return real(self)

    monkeypatch.setattr(peers.Links, "ensure", flaky)
    tasks = Tasks(4, "tree")
    theta = np.linspace(-0.5, 0.5, D + 1)
    try:
        got = tasks.total(theta)
        assert tasks.hub.peer_failures == 1 and tasks.hub.topology == "tree"
        failures["left"] = 10**6
        again = tasks.total(theta)
        assert tasks.hub.topology == "star" and tasks.hub.fell_back
        assert tasks.hub.peer_failures == 1 + 3
    finally:
        tasks.close()
    want = tasks.reference(theta)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(again, want, rtol=1e-12, atol=1e-12)


def test_a_stranger_on_a_tasks_listener_is_dropped():
    """A connection to a task's peer port that does not hold the fit's secret gets no
    link; the pass completes as if it had not come."""
    tasks = Tasks(3, "ring")
    theta = np.full(D + 1, 0.01)
    try:
        tasks.total(theta)                       # links made; now make them anew
        tasks.hub._redo()
        host, port = tasks.hub.addresses[1]
        s = socket.create_connection((host, port))
        clear = peers._CLEAR.pack(peers.PEER_MAGIC, bytes(16), bytes(32))
        s.sendall(clear + bytes(peers.HELLO_BYTES - len(clear)))   # a hello that won't open
        got = tasks.total(theta)
        s.settimeout(5)
        assert s.recv(10) == b""                 # closed by the task
        s.close()
    finally:
        tasks.close()
    np.testing.assert_allclose(got, tasks.reference(theta), rtol=1e-12, atol=1e-12)


def test_a_task_lost_mid_pass_on_a_tree_waits_for_its_next_attempt():
    """Not strict (the file store): the lost task's next attempt connects, the others
    drop their links to the old one, and the pass is redone over the new epoch."""
    tasks = Tasks(4, "tree")
    theta = np.full(D + 1, -0.02)
    try:
        tasks.total(theta)
        victim = tasks.hub._tasks[3]
        victim.sock.shutdown(socket.SHUT_RDWR)          # the hub loses task 3 ...
        replacement = threading.Thread(target=tasks._serve, args=(3,), daemon=True)

        def later():
            time.sleep(0.3)
            replacement.start()                         # ... and its retry connects
        threading.Thread(target=later, daemon=True).start()
        got = tasks.total(theta)
        tasks.threads.append(replacement)
    finally:
        tasks.close()
    np.testing.assert_allclose(got, tasks.reference(theta), rtol=1e-12, atol=1e-12)


def test_a_redone_pass_leaves_top_k_residuals_as_they_were(monkeypatch):
    """Task 1 encodes and sends its sums (taking them out of its residual) in a pass the
    hub then redoes: the residual is put back, so every later total is bit for bit an
    undisturbed run's."""
    thetas = [np.full(D + 1, 0.01 * k) for k in range(1, 5)]

    def run(fail_at):
        real = peers.Links.send
        calls = {"n": 0}

        def flaky(self, chan, op, payload, pass_no, **fields):
            if self.index == 2 and op == wire.OP_REPLY and self.epoch == fail_at:
                calls["n"] += 1
                if calls["n"] == 1:
                    time.sleep(0.3)            # task 1 has sent its sums by now
                    raise peers.PeerError("task 2: injected")
            return real(self, chan, op, payload, pass_no, **fields)

        monkeypatch.setattr(peers.Links, "send", flaky)
        tasks = Tasks(3, "tree", "topk:0.3")
        out = []
        try:
            for k, theta in enumerate(thetas):
                if k == 2:
                    tasks.hub._redo()          # a new epoch at the third pass
                out.append(tasks.total(theta))
            failures = tasks.hub.peer_failures
        finally:
            tasks.close()
        return out, failures

    calm, none = run(fail_at=-5)
    hit, once = run(fail_at=2)
    assert none == 0 and once == 1
    for a, b in zip(calm, hit):
        assert np.array_equal(a, b)


def test_a_stranger_trickling_into_a_tasks_port_costs_at_most_its_hello_time(monkeypatch):
    monkeypatch.setattr(peers, "HELLO_SECONDS", 0.5)
    tasks = Tasks(2, "tree")
    theta = np.full(D + 1, 0.02)
    stop = threading.Event()
    try:
        tasks.total(theta)
        tasks.hub._redo()                        # links are made again at the next pass
        host, port = tasks.hub.addresses[0]      # task 0 accepts task 1
        s = socket.create_connection((host, port))

        def trickle():
            while not stop.is_set():
                try:
                    s.send(b"S")
                except OSError:
                    return
                stop.wait(0.1)

        threading.Thread(target=trickle, daemon=True).start()
        t = time.monotonic()
        got = tasks.total(theta)
        assert time.monotonic() - t < 0.5 + 2.0
    finally:
        stop.set()
        tasks.close()
    np.testing.assert_allclose(got, tasks.reference(theta), rtol=1e-12, atol=1e-12)
