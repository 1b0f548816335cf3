"""The wire against strangers and sniffers: floods, recordings, fake hubs, hostile
checkpoints (issue 24's findings, one test each). Hubs and tasks run in threads here
(no Spark) unless a test says otherwise; the floods come from a process of their own."""
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
import tracemalloc

import numpy as np
import pytest

from sparkgd.engine import hub as hubs
from sparkgd.engine import keys, peers, seal, wire
from sparkgd.engine.hub import Hub

from conftest import ROOT
from test_engine import ACCEPTED, FakeTask
from test_topology import D, Tasks

FLOOD = os.path.join(ROOT, "tests", "flood.py")


def flood(port, n, seconds):
    """``n`` strangers that reconnect as soon as they are dropped, for ``seconds``,
    from a process of their own -- returned once it has started (on a busy machine a
    Python process can take more than the second a test would otherwise wait)."""
    proc = subprocess.Popen([sys.executable, FLOOD, "127.0.0.1", str(port), str(n),
                             str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"
    return proc


def pinned_port(span=1):
    """A port to pin the hub to: free now, and below Linux's ephemeral range (32768 up),
    so no outgoing connection takes it meanwhile -- a flood's client that connects to a
    closed port in that range can even connect to itself, and hold it."""
    import socket

    for port in range(20000 + os.getpid() % 5000 * 2, 32768 - span, 7):
        try:
            for p in range(port, port + span):
                socket.create_server(("127.0.0.1", p)).close()
            return port
        except OSError:
            continue
    raise RuntimeError("no free port below 32768")


def passes(tasks_or_hub, theta, count):
    """``count`` passes: -> their times."""
    times = []
    for _ in range(count):
        t = time.perf_counter()
        tasks_or_hub.evaluate(theta)
        times.append(time.perf_counter() - t)
    return times


# ------------------------------------------------------------ 1. a connection flood


def test_a_flood_of_reconnecting_strangers_costs_the_passes_little():
    """3,000 strangers that reconnect as soon as the hub drops them, for 6 s: the
    hub's loop keeps serving the tasks (it takes at most ACCEPTS_PER_ROUND
    connections a round; strangers are evicted oldest first, never a task), no pass
    waits more than 0.5 s (it stalled 5 s before), a task that connects mid-flood gets
    in, and 40 passes (a fit's worth) during the flood take within 2 s of 40 undisturbed ones (a
    fit's budget in issue 24)."""
    hub = Hub(3, 4, "127.0.0.1", lambda: None, lambda: 3, 5.0, hello_seconds=30.0)
    first = [FakeTask(hub, 0), FakeTask(hub, 1)]
    for t in first:
        t.start()
    waiter = threading.Thread(target=hub.wait_for_tasks, daemon=True)
    theta = np.array([1.0, 2.0])
    storm = flood(hub.port, 3000, 8.0)
    try:
        time.sleep(1.0)                       # the flood is on
        late = FakeTask(hub, 2)               # a task that connects mid-flood
        late.start()
        waiter.start()
        waiter.join(5)
        deadline = time.monotonic() + 5
        while late.verdict is None and time.monotonic() < deadline:   # it reads ACCEPT
            time.sleep(0.01)
        assert not waiter.is_alive() and late.verdict == ACCEPTED
        flooded = passes(hub, theta, 40)
        out = json.loads(storm.communicate(timeout=30)[0].strip().splitlines()[-1])
        calm = passes(hub, theta, 40)
        assert out["dropped"] > 1000          # the strangers were dropped and came back
        assert max(flooded) < 0.5, max(flooded)
        # (a ratio would be of milliseconds: the bound is a fit's, 2 s over as many)
        assert sum(flooded) - sum(calm) < 2.0, (sum(flooded), sum(calm))
        assert hub.rejected > 1000 and len(hub._strangers) <= hub.max_pending
    finally:
        storm.kill()
        hub.close()


def test_the_pending_budget_leaves_most_descriptors_to_the_tasks(monkeypatch):
    """With a soft RLIMIT_NOFILE of 1,024 that may not be raised, the hub keeps at most
    256 handshakes; where it may, it raises the soft limit to the hard one first."""
    calls = []
    monkeypatch.setattr(hubs, "_BUDGET", [])
    monkeypatch.setattr(resource, "getrlimit", lambda r: (1024, 1024))
    monkeypatch.setattr(resource, "setrlimit", lambda r, v: calls.append(v))
    assert hubs.pending_budget() == 256 and calls == []
    monkeypatch.setattr(hubs, "_BUDGET", [])
    monkeypatch.setattr(resource, "getrlimit", lambda r: (1024, 65536))
    assert hubs.pending_budget() == hubs.MAX_PENDING and calls == [(65536, 65536)]


def test_strangers_are_evicted_before_any_task_mid_hello():
    """The pending handshakes are full of strangers; a task that has proved the key
    (its hello's head opened) and is still sending its body is never the one evicted."""
    hub = Hub(1, 4, "127.0.0.1", lambda: None, lambda: 1, 5.0, hello_seconds=30.0)
    hub.max_pending = 8
    waiter = threading.Thread(target=hub.wait_for_tasks, daemon=True)
    waiter.start()
    s = socket.create_connection(("127.0.0.1", hub.port))
    _, _, nonce, share = wire._CHALLENGE.unpack(wire.recv_exact(s, wire._CHALLENGE.size))
    parts, ks = wire.hello_parts(hub.secret, nonce, share, 0, 0, facts=b"{}",
                                 floats=np.ones(1000))
    s.sendall(bytes(parts[0]) + bytes(parts[1]))       # the head: proved
    strangers = []
    for _ in range(60):                                 # then many strangers
        strangers.append(socket.create_connection(("127.0.0.1", hub.port)))
        time.sleep(0.002)
    s.sendall(bytes(parts[2]))                          # the body, last
    conn = wire.Channel(s, wire.Conn(ks.to_hub, ks.to_task))
    try:
        assert conn.recv(wire.FIRST_FRAME, time.monotonic() + 5).op == wire.OP_ACCEPT
        waiter.join(5)
        assert not waiter.is_alive()
        assert hub.rejected >= 60 - 8
    finally:
        hub.close()
        for x in strangers:
            x.close()


def closed(s, seconds=2.0):
    """Whether the other end closed ``s`` (what it sent before is read past)."""
    s.settimeout(seconds)
    try:
        while s.recv(4096):
            pass
        return True
    except socket.timeout:
        return False
    except OSError:
        return True


def test_one_round_takes_a_bounded_number_of_connections(monkeypatch):
    """A listener that always has another connection (a flood faster than the hub):
    one round of the loop accepts ACCEPTS_PER_ROUND of them and returns to the tasks,
    and the strangers held stay within the pending budget, the oldest dropped first."""
    hub = Hub(1, 4, "127.0.0.1", lambda: None, lambda: 1, 5.0)
    hub.max_pending = 50
    made = []
    fd = hub._listener.fileno()

    class Endless:
        def accept(self):
            a, b = socket.socketpair()
            made.append(b)
            return a, ("127.0.0.1", 1)

        def fileno(self):
            return fd

    real = hub._listener
    hub._listener = Endless()
    try:
        hub._accept()
        assert len(made) == hubs.ACCEPTS_PER_ROUND
        for _ in range(5):
            hub._accept()
        assert len(made) == 6 * hubs.ACCEPTS_PER_ROUND
        assert len(hub._strangers) == 50 and hub.rejected == len(made) - 50
        kept = {p.sock for p in hub._strangers.values()}
        assert all(closed(b) for b in made[:len(made) - 50])   # the oldest went
        assert not any(closed(b, 0.05) for b in made[len(made) - 50:])
        assert len(kept) == 50
    finally:
        hub._listener = real
        hub.close()
        for b in made:
            b.close()


# ------------------------------------------------------------ 4. a task's peer port


def test_strangers_at_a_tasks_port_neither_fail_an_epoch_nor_force_star():
    """40 idle connections, 10 that trickle a byte every 0.1 s and 10 that send a hello
    that does not open, all at task 0's peer port while the tree makes its links:
    they are handled at once, each within its own hello time; the pass completes on
    the first epoch, and the topology stays a tree."""
    tasks = Tasks(3, "tree")
    theta = np.full(D + 1, 0.02)
    stop = threading.Event()
    strangers = []
    try:
        tasks.total(theta)
        epoch = tasks.hub.epoch
        tasks.hub._redo()                       # links are made again at the next pass
        host, port = tasks.hub.addresses[0]     # task 0 accepts tasks 1 and 2
        strangers = [socket.create_connection((host, port)) for _ in range(60)]
        bad = peers._CLEAR.pack(peers.PEER_MAGIC, os.urandom(16), os.urandom(32))
        for s in strangers[40:50]:
            s.sendall(bad + bytes(peers.HELLO_BYTES - len(bad)))

        def trickle():
            while not stop.is_set():
                for s in strangers[50:]:
                    try:
                        s.send(b"S")
                    except OSError:
                        pass
                stop.wait(0.1)

        threading.Thread(target=trickle, daemon=True).start()
        t = time.monotonic()
        got = tasks.total(theta)
        took = time.monotonic() - t
        assert tasks.hub.epoch == epoch + 1 and tasks.hub.peer_failures == 0
        assert tasks.hub.topology == "tree" and not tasks.hub.fell_back
        assert took < peers.HELLO_SECONDS, took   # no stranger held a link up
    finally:
        stop.set()
        tasks.close()
        for s in strangers:
            s.close()
    np.testing.assert_allclose(got, tasks.reference(theta), rtol=1e-12, atol=1e-12)


def test_a_recorded_peer_hello_played_again_takes_no_link(monkeypatch):
    """A connector's hello recorded on the wire and played again at the acceptor: the
    acceptor answers, but the replay cannot confirm (it lacks the share's private
    half), so the real task still takes its link."""
    recorded = []
    real = peers.Links._connect

    def recording(self, j, deadline):
        sock, mine, nonce_c = real(self, j, deadline)
        clear = peers._CLEAR.pack(peers.PEER_MAGIC, nonce_c, mine.public)
        sealed = seal.Sealer(peers._hello_key(self.secret, nonce_c)).seal(
            clear, peers._WHO.pack(self.index, self.epoch + 1))
        recorded.append((self.addresses[j], clear + sealed))
        return sock, mine, nonce_c

    monkeypatch.setattr(peers.Links, "_connect", recording)
    tasks = Tasks(2, "ring")
    theta = np.full(D + 1, 0.01)
    try:
        tasks.total(theta)
        (host, port), hello = recorded[-1]      # a hello valid for the next epoch
        tasks.hub._redo()
        replay = socket.create_connection((host, port))
        replay.sendall(hello)
        got = tasks.total(theta)
        assert tasks.hub.peer_failures == 0
        replay.settimeout(5)
        assert len(replay.recv(peers.REPLY_BYTES)) > 0    # answered, but never a link
    finally:
        tasks.close()
    np.testing.assert_allclose(got, tasks.reference(theta), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------ 5. a fake hub


def fake_hub(behave):
    """A listener that greets like a hub and then does ``behave(sock)``."""
    listener = socket.create_server(("127.0.0.1", 0))

    def run():
        sock, _ = listener.accept()
        with sock:
            sock.sendall(wire._CHALLENGE.pack(wire.MAGIC, wire.VERSION, os.urandom(16),
                                              seal.Share().public))
            behave(sock)

    threading.Thread(target=run, daemon=True).start()
    return listener


def test_a_fake_hubs_length_allocates_nothing():
    """A hub without the fit's key claims a 1 GiB frame: the task refuses it before
    allocating (it takes FIRST_FRAME bytes until the hub, sealed, says more)."""
    def claim(sock):
        wire.recv_exact(sock, wire.HELLO_HEAD_BYTES)
        sock.sendall(wire._PREFIX.pack(wire.OP_ACCEPT, 1 << 30))
        time.sleep(2)

    listener = fake_hub(claim)
    tracemalloc.start()
    try:
        with pytest.raises(wire.ProtocolError, match="bad frame header"):
            wire.connect(listener.getsockname(), b"k" * 32, 0, 0, timeout=5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        listener.close()
    assert peak < 4 << 20, peak


def test_a_trickling_fake_hub_costs_one_deadline():
    """A hub that trickles its verdict a byte at a time: connect, hello and verdict
    have one deadline in all, and the task says the hub was unreachable (marked: the
    fit falls back)."""
    def trickle(sock):
        verdict = wire._PREFIX.pack(wire.OP_ACCEPT, 0) + bytes(wire.sealed_size(0))
        try:
            for byte in verdict:             # a frame that looks fine, one byte at a time
                sock.sendall(bytes([byte]))
                time.sleep(0.05)
        except OSError:
            pass                             # the task gave up and closed

    listener = fake_hub(trickle)
    t = time.monotonic()
    try:
        with pytest.raises(wire.HubUnreachable, match=wire.UNREACHABLE_MARKER):
            wire.connect(listener.getsockname(), b"k" * 32, 0, 0, timeout=1.0)
    finally:
        listener.close()
    assert time.monotonic() - t < 1.0 + 0.5     # the deadline, plus a scheduling slack


# ------------------------------------------------------------ 7. a leaked port


def test_a_settings_error_leaves_no_port_open(monkeypatch):
    """50 serving jobs refused for a bad setting: every setting is read before the hub
    binds, so no listening socket is left behind."""
    from sparkgd.engine import jobs
    from sparkgd.errors import SparkgdError

    class Conf(dict):
        def get(self, key, default=None):
            return super().get(key, default)

    class Sc:
        master = "local[2]"

        def getConf(self):
            return Conf({"spark.driver.host": "127.0.0.1", jobs.SLOW_TASK_CONF: "x:y"})

    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        with pytest.raises(SparkgdError, match="index:factor"):
            jobs.ServingJob(Sc(), "served", 1, 0)
    assert len(os.listdir("/proc/self/fd")) <= before + 2


# ------------------------------------------------------------ the fit's key


def test_the_fit_key_follows_what_spark_protects(monkeypatch):
    conf = {}
    get = conf.get
    assert "local master" in keys.choose(get, local=True).source
    assert "Spark sends it in the clear" in keys.choose(get, local=False).source
    conf.update({"spark.authenticate": "true", "spark.network.crypto.enabled": "true"})
    k = keys.choose(get, local=False)
    assert "Spark encrypts it" in k.source and k.for_tasks == k.key
    conf.pop("spark.network.crypto.enabled")
    k = keys.choose(get, local=False, spark_secret=lambda: "s3cret")
    assert k.for_tasks[0] == "spark-secret" and k.key not in repr(k.for_tasks).encode()
    monkeypatch.setenv(keys.SECRET_ENV, "s3cret")
    assert keys.for_task(k.for_tasks) == k.key             # what a task makes is the hub's
    monkeypatch.setenv(keys.SECRET_ENV, "another")
    assert keys.for_task(k.for_tasks) != k.key
    monkeypatch.delenv(keys.SECRET_ENV)
    with pytest.raises(RuntimeError, match=keys.NO_KEY_MARKER):
        keys.for_task(k.for_tasks)
    on_connect = keys.choose(get, local=False, hub_in_task=True)
    assert on_connect.key is None and on_connect.for_tasks[0] == "spark-secret"


# ------------------------------------------------------------ 6. hostile checkpoints


class _Facts:
    num_rows, num_features = 100, 3
    infos = [{"wsum": 100.0, "ymin": 0.0, "ymax": 1.0, "nnz": 300}]

    def label_weights(self):
        return None


def _checkpoint(tmp_path):
    from sparkgd import checkpoint

    ck = checkpoint.Checkpointer(str(tmp_path / "ck"), 1, {"regParam": 0.1}, _Facts(),
                                 "sync", size=4, d=3)
    ck.space_arrays = {"x0": np.zeros(4), "mean": np.zeros(3), "std": np.ones(3)}
    ck.save(1, [0.5], [0.1], evaluations=(["h"], [False], [0.5], [np.ones(4)]))
    return ck, tmp_path / "ck"


def _reader(directory):
    from sparkgd import checkpoint

    return checkpoint.Checkpointer(str(directory), 1, {"regParam": 0.1}, _Facts(), "sync",
                                   size=4, d=3)


def test_a_checkpoint_names_no_file_outside_its_directory(tmp_path):
    """``segments`` pointing elsewhere: refused on load (one-line error), and nothing
    outside the directory is read or removed."""
    from sparkgd.errors import SparkgdError

    ck, directory = _checkpoint(tmp_path)
    victim = tmp_path / "thesis.json"
    victim.write_text("{}")
    meta = json.loads((directory / "checkpoint.json").read_text())
    meta["segments"] = ["../thesis"]
    (directory / "checkpoint.json").write_text(json.dumps(meta))
    reader = _reader(directory)
    with pytest.raises(SparkgdError, match="not this format's file names"):
        reader.load()
    reader.remove()
    assert victim.exists()
    meta["segments"], meta["iteration"] = ["evals-00001"], "1; rm -rf /"
    (directory / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(SparkgdError, match="iteration"):
        _reader(directory).load()


@pytest.mark.parametrize("what", ["extra member", "wrong shape", "claims 2^27 values",
                                  "not float64"])
def test_a_checkpoints_arrays_are_checked_before_they_are_read(tmp_path, what):
    import zipfile

    from sparkgd.errors import SparkgdError

    ck, directory = _checkpoint(tmp_path)
    path = directory / "space.npz"
    if what == "extra member":
        np.savez(path, x0=np.zeros(4), mean=np.zeros(3), std=np.ones(3), evil=np.ones(9))
    elif what == "wrong shape":
        np.savez(path, x0=np.zeros(5), mean=np.zeros(3), std=np.ones(3))
    elif what == "not float64":
        np.savez(path, x0=np.zeros(4, dtype=np.int64))
    else:                   # a small file whose member claims 2^27 values: 1 GiB
        header = np.lib.format.header_data_from_array_1_0(np.zeros(4))
        header["shape"] = (1 << 27,)
        body = io_bytes(header)
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("x0.npy", body + bytes(1 << 20))
    reader = _reader(directory)
    reader.load()
    tracemalloc.start()
    try:
        with pytest.raises(SparkgdError, match="cannot be used"):
            reader.space()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak


def io_bytes(header):
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def test_a_saved_model_whose_npy_claims_too_much_is_refused(tmp_path):
    """A model directory whose coefficients.npy claims (2^40,) values: one-line
    SparkgdError, no MemoryError."""
    from sparkgd import persist
    from sparkgd.errors import SparkgdError
    from sparkgd.models import MODEL_CLASSES

    d = tmp_path / "m"
    d.mkdir()
    (d / "metadata.json").write_text(json.dumps({"class": "LinearRegressionModel",
                                                 "loss": "squared", "numFeatures": 3,
                                                 "numClasses": None}))
    header = np.lib.format.header_data_from_array_1_0(np.zeros(3))
    header["shape"] = (1 << 40,)
    (d / "coefficients.npy").write_bytes(io_bytes(header) + bytes(64))
    np.save(d / "intercept.npy", np.float64(0.5))
    with pytest.raises(SparkgdError, match="coefficients.npy: .*values claimed"):
        persist.load_model(str(d), MODEL_CLASSES)
    np.save(d / "coefficients.npy", np.ones(3))
    assert persist.load_model(str(d), MODEL_CLASSES).numFeatures == 3


# ------------------------------------------------------------ 9. a JVM that died


@pytest.mark.parametrize("error", [
    ConnectionRefusedError(111, "Connection refused"),
    RuntimeError("An error occurred while calling o42.collectToPython.\n"
                 ": java.lang.OutOfMemoryError: Java heap space\n\tat org.apache..."),
    type("Py4JNetworkError", (Exception,), {})("Answer from Java side is empty"),
])
def test_a_jvm_that_died_is_reported_as_such_with_the_remedy(error):
    """The case issue 24 found: local[8], 1 GiB, 2,000 features a row -- the Parquet
    reader ran out of heap and the job said "cannot read --data: Connection refused"."""
    from sparkgd import cli
    from sparkgd.errors import first_line

    line = first_line(error)
    assert "Spark's JVM died" in line and "--driver-memory" in line
    assert "columnarReaderBatchSize" in line and "\n" not in line


def test_other_errors_are_not_called_a_dead_jvm():
    from sparkgd.errors import first_line

    assert "JVM" not in first_line(RuntimeError("Failed to connect to host:7337: "
                                                "Connection refused (a shuffle fetch)"))
    assert "JVM" not in first_line(ValueError("label column 'y' holds 3"))


# ------------------------------------------------------------ 2. a recording of a fit


class Sniffer(threading.Thread):
    """Every TCP segment on the loopback interface (a raw AF_PACKET socket: root), put
    back together per connection and direction: ``streams[(src_port, dst_port)]``."""

    def __init__(self):
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(3))
        # a buffer that a fit's loopback traffic (Arrow batches, closures) cannot overflow:
        # the kernel drops what does not fit, and a stream with a hole is no recording
        self.sock.setsockopt(socket.SOL_SOCKET, 33, 256 << 20)     # SO_RCVBUFFORCE (root)
        self.sock.bind(("lo", 0))
        self.sock.settimeout(0.2)
        self.stop = threading.Event()
        self.segments = {}

    def run(self):
        while not self.stop.is_set():
            try:
                pkt = self.sock.recv(1 << 17)
            except socket.timeout:
                continue
            if len(pkt) < 34 or pkt[12:14] != b"\x08\x00" or pkt[23] != 6:   # IPv4, TCP
                continue
            ihl = (pkt[14] & 0x0F) * 4
            total = int.from_bytes(pkt[16:18], "big")
            tcp = 14 + ihl
            sport, dport = int.from_bytes(pkt[tcp:tcp + 2], "big"), \
                int.from_bytes(pkt[tcp + 2:tcp + 4], "big")
            seq = int.from_bytes(pkt[tcp + 4:tcp + 8], "big")
            data = pkt[tcp + (pkt[tcp + 12] >> 4) * 4:14 + total]
            if data:
                self.segments.setdefault((sport, dport), {})[seq] = data

    def streams(self, whole=()):
        """Each direction's bytes in order; the ports in ``whole`` must have no hole."""
        out = {}
        for key, segs in self.segments.items():
            order = sorted(segs)                                 # (no wrap in a test)
            if set(key) & set(whole):
                for a, b in zip(order, order[1:]):
                    assert a + len(segs[a]) == b, f"the capture of {key} has a hole"
            out[key] = b"".join(segs[s] for s in order)
        return out


@pytest.mark.parametrize("private", [False, True], ids=["lbfgs", "DP-SGD"])
def test_a_recording_of_a_whole_fit_opens_nothing(spark, tmp_path, monkeypatch, private):
    """Every byte on the loopback during a served fit (the tasks' closures between
    Spark and its Python workers too -- where, with a local master, the fit's key
    rides): the model's coefficients, the tasks' facts and the DP-free sums appear in
    no hub connection; no 32-byte window of the whole recording, taken as the fit's
    key, opens a task's hello -- though the fit's key is in the recording -- because
    every connection's keys also need an X25519 secret that never travels; and with
    the hub's private share (which only the hub has) the same hellos do open: the
    recording is whole, and it is the fit."""
    import sparkgd
    from conftest import logistic_data, to_df

    hubs_made = []
    real_init = Hub.__init__

    def recording_init(self, *a, **kw):
        real_init(self, *a, **kw)
        hubs_made.append(self)

    monkeypatch.setattr(Hub, "__init__", recording_init)
    from sparkgd.modes import dp

    seeds = []
    real_dp = dp.PrivateObjective.__init__

    def recording_dp(self, *a, **kw):
        real_dp(self, *a, **kw)
        seeds.append(self._seed)

    monkeypatch.setattr(dp.PrivateObjective, "__init__", recording_dp)
    X, y, _ = logistic_data(n=400, d=5, seed=4)
    df = to_df(spark, X, y, partitions=2)
    port = pinned_port(21)
    spark.conf.set("spark.sparkgd.hub.ports", f"{port}-{port + 20}")
    sniffer = Sniffer()
    sniffer.start()
    try:
        est = sparkgd.LogisticRegression(optimizer="sgd", stepSize=0.5, maxIter=10,
                                         miniBatchFraction=0.5, noiseMultiplier=1.0) \
            if private else sparkgd.LogisticRegression(regParam=0.01, tol=1e-10)
        model = est.fit(df)
    finally:
        spark.conf.unset("spark.sparkgd.hub.ports")
        sniffer.stop.set()
        sniffer.join(5)
    assert model.summary.engine == "served, sealed"
    assert bool(seeds) == private
    hub = hubs_made[-1]
    streams = sniffer.streams(whole=[hub.port])
    everything = b"".join(streams.values())
    to_tasks = {k: v for k, v in streams.items() if k[0] == hub.port}
    to_hub = {k: v for k, v in streams.items() if k[1] == hub.port}
    assert len(to_hub) >= 2 and all(to_hub.values())
    assert hub.secret in everything          # the key rode in a closure (local master)
    coef = np.r_[model.coefficients, model.intercept]
    for stream in list(to_tasks.values()) + list(to_hub.values()):
        for v in coef:
            assert np.float64(v).tobytes() not in stream
        assert b"wsum" not in stream and b"logistic" not in stream
        for seed in seeds:                  # DP-SGD: which rows a step drew stays secret
            assert seed.to_bytes(8, "little") not in stream
    # what a sniffer can try: every 32-byte window as the fit's key, no shared secret
    hellos = []
    for (tport, _), data in to_hub.items():
        challenge = to_tasks[(hub.port, tport)][:wire.CHALLENGE_BYTES]
        _, _, hub_nonce, hub_share = wire._CHALLENGE.unpack(challenge)
        clear = data[:wire._HELLO_CLEAR.size]
        _, task_nonce, task_share = wire._HELLO_CLEAR.unpack(clear)
        head = data[wire._HELLO_CLEAR.size:wire.HELLO_HEAD_BYTES]
        hellos.append((hub_nonce, task_nonce, task_share, clear, head))

    def opens(key, shared, hello):
        hub_nonce, task_nonce, _, clear, head = hello
        ks = wire.Keys(key, shared, hub_nonce, task_nonce)
        try:
            seal.Sealer(ks.hello).open(clear + hub_nonce, head)
            return True
        except seal.Unsealed:
            return False

    # the windows a sniffer would try first: around every place the key shows (the key
    # itself among them), and 5,000 more from anywhere in the recording
    rng = np.random.default_rng(0)
    starts, at = [], everything.find(hub.secret)
    while at >= 0:
        starts.extend(range(max(0, at - 64), at + 64))
        at = everything.find(hub.secret, at + 1)
    starts.extend(rng.integers(0, len(everything) - 32, size=5000).tolist())
    windows = {everything[i:i + 32] for i in starts}
    assert hub.secret in windows
    hello = hellos[0]
    assert not any(opens(w, b"", hello) for w in windows)
    assert not opens(hub.secret, b"", hello) and not opens(hub.secret, hello[2], hello)
    # the hub's own private share: what nobody else has
    for h in hellos:
        assert opens(hub.secret, hub._share.shared(h[2]), h)


def test_a_flood_during_a_fit_changes_neither_the_model_nor_much_its_time(spark,
                                                                         monkeypatch):
    """From outside, as issue 24 measured it: the hub's port pinned, 3,000 strangers
    that reconnect as soon as they are dropped, for the whole of a fit: the model is
    bit for bit the undisturbed one, the fit at most 2 s longer (it took 120 s more
    before: the served build failed and the fit went to block files)."""
    import sparkgd
    from conftest import logistic_data, to_df

    X, y, _ = logistic_data(n=4000, d=8, seed=9)
    df = to_df(spark, X, y, partitions=2).cache()
    df.count()
    # The hub accepts at most ACCEPTS_PER_ROUND (32) connections a round, ~640 a second,
    # and drops strangers (oldest first) only past its pending budget: at the default
    # 1,024 the first drop comes ~1.6 s in, after a fit of 0.5 s (0 drops in two CI
    # runs). A budget of 64 makes the flood cost what it costs -- drops from the first
    # tenth of a second -- whatever the fit's length: measured 1,854 and 2,814 drops, the
    # fit 0.9 and 1.1 s longer than the calm one (issue 24 measured +0.9 s).
    monkeypatch.setattr(hubs, "_BUDGET", [64])
    est = sparkgd.LogisticRegression(optimizer="gd", stepSize=0.5, maxIter=60, tol=0.0)
    port = pinned_port()
    spark.conf.set("spark.sparkgd.hub.ports", str(port))
    try:
        est.fit(df)                                       # warm
        t = time.perf_counter()
        calm = est.fit(df)
        calm_s = time.perf_counter() - t
        storm = flood(port, 3000, 120.0)
        time.sleep(1.0)
        try:
            t = time.perf_counter()
            flooded = est.fit(df)
            flooded_s = time.perf_counter() - t
        finally:
            storm.kill()
            storm.wait()
    finally:
        spark.conf.unset("spark.sparkgd.hub.ports")
        df.unpersist()
    assert flooded.summary.engine == "served, sealed"
    # the flood reached the hub throughout (at most ACCEPTS_PER_ROUND a round, rounds
    # every ACCEPT_PAUSE while every task is connected: ~600 a second)
    assert flooded.summary.droppedConnections > 100, flooded.summary.droppedConnections
    np.testing.assert_array_equal(flooded.coefficients, calm.coefficients)
    assert flooded.intercept == calm.intercept
    assert flooded.summary.objectiveHistory == calm.summary.objectiveHistory
    assert flooded_s - calm_s < 2.0, (flooded_s, calm_s)
