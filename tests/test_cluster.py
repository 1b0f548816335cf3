"""./spark-submit.sh against a real Spark standalone cluster on loopback.

A module fixture starts a standalone master and one worker (2 cores, 2 GiB) from the
venv's own pyspark (``$SPARK_HOME/bin/spark-class``), bound to 127.0.0.1 on free
ports, with logs, work dir and an empty SPARK_CONF_DIR in a temp directory. It waits
until the master is up and the worker has registered, and at teardown stops exactly
the process groups it started. Then:

* a training job submitted with ``--master spark://...`` exits 0, saves a 10-feature
  model, really ran in an executor on the worker (the master launched it, the
  worker's work dir has the app's executor directory with its logs and the shipped
  sparkgd zip, and the executor's Python workers were the venv's interpreter), and
  reached the same final objective (to 1e-9 relative) as a ``--master local[2]`` run
  of the same command -- the model must not depend on where it ran;
* a bad ``--data`` fails on the cluster as it does locally: exit 2, one
  ``sparkgd: error:`` line on stderr, no output directory, no application started;
* a fixed-step GD fit survives losing its executor: the test SIGKILLs the job's
  executor JVM (the ``CoarseGrainedExecutorBackend`` under the worker started here)
  once iteration 10 is printed, or while the blocks are being written; the worker
  launches a replacement, Spark reruns the lost tasks, whose new attempts build the
  same blocks and take the lost ones' places (or a new job builds them), and the fit
  goes on from the iteration it had reached (each iteration printed once), exits 0 after all its
  iterations with the model of an undisturbed ``--master local[2]`` run (coefficients
  to 1e-9), while the driver, worker and master logs show the executor lost and a new
  one launched.

Throughout, a watcher thread polls /proc and records every listening TCP socket of the
processes started here and of their descendants (driver, executors, Python workers):
all of them must be on 127.0.0.1. The jobs are run with SPARK_LOCAL_IP=127.0.0.1 in
their environment; without it the driver's web UI listens on all interfaces.

Only a missing Java skips the module (bootstrap.sh reports that case itself); anything
else that keeps the cluster from starting fails, with the tails of the daemon logs.
"""
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT

SUBMIT = os.path.join(ROOT, "spark-submit.sh")
VENV_BIN = os.path.join(ROOT, ".venv", "bin")
LOOPBACK = "127.0.0.1"
START_TIMEOUT = 60   # master up + worker registered
JOB_TIMEOUT = 240    # one spark-submit run
TRAIN = ["jobs/train.py", "--max-iter", "30", "--partitions", "4"]
# Fixed-step gradient descent: deterministic, so a run that lost its executor half-way
# must still reach the model of an undisturbed local run. A pass on the sample through the
# serving tasks takes about a millisecond: enough iterations that the kill lands mid-fit.
GD_ITERS = 8000
GD_TRAIN = ["jobs/train.py", "--optimizer", "gd", "--step-size", "0.5", "--max-iter",
            str(GD_ITERS), "--tol", "0", "--partitions", "4"]
KILL_AT_ITER = 10


def _tail(path, lines=40):
    try:
        with open(path, errors="replace") as f:
            text = f.read().splitlines()
    except OSError as e:
        return f"==> {path}: {e}"
    return f"==> {path} (last {lines} lines) <==\n" + "\n".join(text[-lines:])


def _java_available():
    home = os.environ.get("JAVA_HOME")
    if home:
        return os.access(os.path.join(home, "bin", "java"), os.X_OK)
    return shutil.which("java") is not None


def _spark_home():
    """The pyspark package of the interpreter running the tests (the venv's)."""
    r = subprocess.run(
        [sys.executable, "-c", "import os, pyspark; print(os.path.dirname(pyspark.__file__))"],
        capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"pyspark is not importable from {sys.executable}: {r.stderr}"
    return r.stdout.strip()


def _free_ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _stop_group(proc, sig_timeout=20):
    """Stop the process group led by ``proc`` (started with start_new_session=True, so
    its pgid is its pid; until we reap it, or while any member of its group lives, that
    id cannot be reused). The JVM daemons stop their children (executors) on SIGTERM."""
    if proc.returncode is None:
        for sig, timeout in ((signal.SIGTERM, sig_timeout), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=timeout)
                break
            except subprocess.TimeoutExpired:
                continue
    # Stragglers of the group (e.g. spark-class's launcher subshell) after the leader.
    until = time.monotonic() + 5
    while _group_members(proc.pid):
        if time.monotonic() > until:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            break
        time.sleep(0.1)


def _group_members(pgid):
    members = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            members.append(int(d))
    return members


# --------------------------------------------------------------------------- /proc watcher


class Watch(threading.Thread):
    """Polls /proc every ``interval`` seconds. For each registered root process (by
    label) it records every descendant's command line and every TCP socket in LISTEN
    state they hold, as (label, pid, program, ip, port)."""

    def __init__(self, interval=0.3):
        super().__init__(daemon=True, name="sparkgd-cluster-watch")
        self.interval = interval
        self.lock = threading.Lock()
        self.roots = {}        # pid -> label
        self.cmdlines = {}     # label -> {pid: [argv...]}
        self.listeners = set()
        self.stopping = threading.Event()

    def add(self, pid, label):
        with self.lock:
            self.roots[pid] = label
        self.poll()

    def remove(self, pid):
        self.poll()
        with self.lock:
            self.roots.pop(pid, None)

    def stop(self):
        self.stopping.set()
        self.join(timeout=10)

    def run(self):
        while not self.stopping.wait(self.interval):
            try:
                self.poll()
            except Exception:  # never let a /proc race kill the watcher
                pass

    @staticmethod
    def _listening():
        table = {}
        for name in ("tcp", "tcp6"):
            try:
                with open(f"/proc/net/{name}") as f:
                    lines = f.read().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                fields = line.split()
                if fields[3] != "0A":  # TCP_LISTEN
                    continue
                addr, port = fields[1].split(":")
                raw = bytes.fromhex(addr)  # 32-bit words in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                ip = ipaddress.ip_address(raw)
                if ip.version == 6 and ip.ipv4_mapped:
                    ip = ip.ipv4_mapped
                table[fields[9]] = (str(ip), int(port, 16))
        return table

    def poll(self):
        with self.lock:
            roots = dict(self.roots)
        if not roots:
            return
        children = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                children.setdefault(ppid, []).append(int(d))
        listening = None
        for root, label in roots.items():
            stack, seen = [root], set()
            while stack:
                pid = stack.pop()
                if pid in seen:
                    continue
                seen.add(pid)
                stack.extend(children.get(pid, ()))
            for pid in seen:
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
                    inodes = set()
                    for fd in os.listdir(f"/proc/{pid}/fd"):
                        try:
                            link = os.readlink(f"/proc/{pid}/fd/{fd}")
                        except OSError:
                            continue
                        if link.startswith("socket:["):
                            inodes.add(link[8:-1])
                except OSError:
                    continue
                with self.lock:
                    self.cmdlines.setdefault(label, {})[pid] = argv
                if inodes:
                    if listening is None:
                        listening = self._listening()
                    prog = os.path.basename(argv[0]) if argv else "?"
                    for inode in inodes & listening.keys():
                        ip, port = listening[inode]
                        with self.lock:
                            self.listeners.add((label, pid, prog, ip, port))

    def not_loopback(self):
        with self.lock:
            return sorted(x for x in self.listeners if x[3] != LOOPBACK)

    def assert_loopback_only(self):
        bad = self.not_loopback()
        assert not bad, f"listening on something other than {LOOPBACK}: {bad}"


@pytest.fixture(scope="module")
def watch():
    if not _java_available():
        pytest.skip("no Java found (JAVA_HOME or java on PATH); ./spark-submit.sh reports this "
                    "itself with 'sparkgd: error: Java 17 or newer is required'")
    w = Watch()
    w.start()
    yield w
    w.stop()


# --------------------------------------------------------------------------- spark-submit jobs


class Job:
    """One ./spark-submit.sh run in its own session, output to files in ``logdir``."""

    def __init__(self, name, args, logdir, watch, timeout=JOB_TIMEOUT):
        self.name, self.args, self.watch = name, args, watch
        self.out_path = os.path.join(logdir, f"{name}.stdout")
        self.err_path = os.path.join(logdir, f"{name}.stderr")
        env = dict(os.environ, SPARK_LOCAL_IP=LOOPBACK)
        env.pop("SPARKGD_DEBUG", None)  # it adds a line to stderr
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen([SUBMIT, *args], cwd=ROOT, env=env,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                         start_new_session=True)
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        watch.add(self.proc.pid, name)

    def wait(self):
        try:
            self.proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.name}: ./spark-submit.sh {' '.join(self.args)} did not finish "
                        f"in {JOB_TIMEOUT}s\n{_tail(self.out_path)}\n{_tail(self.err_path)}")
        self.seconds = time.monotonic() - self.started
        # The stderr filter of spark-submit.sh (grep, same process group) may still be
        # writing the JVM's last lines: wait for the group to empty before reading.
        until = time.monotonic() + 10
        while _group_members(self.proc.pid) and time.monotonic() < until:
            time.sleep(0.05)
        self.watch.remove(self.proc.pid)
        with open(self.out_path, errors="replace") as f:
            self.stdout = f.read()
        with open(self.err_path, errors="replace") as f:
            self.stderr = f.read()
        return self

    def kill(self):
        if self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.watch.remove(self.proc.pid)

    def describe(self):
        text = (f"{self.name}: exit {self.proc.returncode}\n--- stdout ---\n{self.stdout[-3000:]}"
                f"\n--- stderr ---\n{self.stderr[-3000:]}")
        return text


# --------------------------------------------------------------------------- executors

EXECUTOR_CLASS = "org.apache.spark.executor.CoarseGrainedExecutorBackend"
ITER_LINE = re.compile(r"^sparkgd: iter\s+(\d+)\s+objective", re.M)


def _process_table():
    """pid -> (ppid, argv) of every live (not zombie) process we can read."""
    table = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except (OSError, ValueError, IndexError):
            continue
        if fields[0] != "Z":
            table[int(d)] = (int(fields[1]), argv)
    return table


def _has_ancestor(table, pid, root):
    seen = set()
    while pid in table and pid not in seen:
        if pid == root:
            return True
        seen.add(pid)
        pid = table[pid][0]
    return False


def _arg(argv, name):
    try:
        return argv[argv.index(name) + 1]
    except (ValueError, IndexError):
        return None


def _executors(table, worker_pid, old_apps=()):
    """The executor JVMs whose parent chain leads to ``worker_pid``, minus those of
    ``old_apps``: {pid: (app id, executor id)}."""
    def is_executor(pid):
        argv = table[pid][1] if pid in table else []
        return bool(argv) and os.path.basename(argv[0]) == "java" and EXECUTOR_CLASS in argv

    found = {}
    for pid, (ppid, argv) in table.items():
        # A child the executor JVM has just forked shows the JVM's command line until it
        # execs (a Python worker, jspawnhelper): never take that for the executor.
        if not is_executor(pid) or is_executor(ppid):
            continue
        if not _has_ancestor(table, pid, worker_pid):
            continue
        app = _arg(argv, "--app-id")
        if app not in old_apps:
            found[pid] = (app, _arg(argv, "--executor-id"))
    return found


def _iterations(path):
    with open(path, errors="replace") as f:
        return [int(n) for n in ITER_LINE.findall(f.read())]


def _python_workers(table, pid):
    return [p for p, (_pp, argv) in table.items()
            if "pyspark.daemon" in argv and _has_ancestor(table, p, pid)]


def _kill_executor(job, cluster, old_apps, phase, kill_at):
    """Poll the driver's stdout and the worker's process tree every 20 ms; SIGKILL the
    job's executor JVM when ``phase`` is reached:

    * ``iteration``: the progress line of iteration ``kill_at`` (or later) is out;
    * ``build``: the executor has started its first Python worker (the first Python
      work of a fit is writing the blocks, mapInArrow) and no iteration has run yet.

    Returns what was killed, when, and how far the fit was."""
    while True:
        done = _iterations(job.out_path)
        table = _process_table()
        execs = _executors(table, cluster.worker.pid, old_apps)
        target = None
        if phase == "iteration" and max(done, default=0) >= kill_at:
            assert len(execs) == 1, (execs, job.name)
            target = next(iter(execs))
        elif phase == "build":
            assert not done, f"iterations began before a Python worker was seen: {done}"
            for pid in execs:
                if _python_workers(table, pid):
                    target = pid
        if target is not None:
            os.kill(target, signal.SIGKILL)
            app, executor = execs[target]
            return {"pid": target, "app": app, "executor": executor, "at": time.monotonic(),
                    "iteration": max(done, default=0)}
        if job.proc.poll() is not None:
            pytest.fail(f"{job.name} ended (exit {job.proc.returncode}) before the executor was "
                        f"killed ({phase}); iterations seen: {done}\n{_tail(job.out_path)}\n"
                        f"{_tail(job.err_path)}")
        if time.monotonic() > job.deadline:
            job.kill()
            pytest.fail(f"{job.name}: {phase} not reached in {JOB_TIMEOUT}s\n"
                        f"{_tail(job.out_path)}\n{_tail(job.err_path)}")
        time.sleep(0.02)


def _after_kill(job, cluster, killed):
    """Follow the job after the kill: when the worker's replacement executor JVM (for
    the same app, another pid) is first seen, and when the driver prints its next
    iteration. Returns (replacement pids, seconds to it, seconds to the next iteration);
    a None where the job ended first."""
    replacements, to_new, to_iter = set(), None, None
    while job.proc.poll() is None and time.monotonic() < job.deadline:
        now = time.monotonic() - killed["at"]
        if to_new is None or to_iter is None:  # /proc scans cost CPU: stop when done
            for pid, (app, _e) in _executors(_process_table(), cluster.worker.pid).items():
                if app == killed["app"] and pid != killed["pid"]:
                    replacements.add(pid)
                    to_new = now if to_new is None else to_new
        else:
            break
        if to_iter is None and max(_iterations(job.out_path), default=0) > killed["iteration"]:
            to_iter = now
        time.sleep(0.05)
    return replacements, to_new, to_iter


# --------------------------------------------------------------------------- the cluster


class Cluster:
    def __init__(self, base, spark_home, watch):
        self.base, self.spark_home, self.watch = base, spark_home, watch
        self.work_dir = os.path.join(base, "work")
        self.logs = os.path.join(base, "logs")
        conf_dir = os.path.join(base, "conf")  # empty: no spark-env.sh / spark-defaults.conf
        for d in (self.work_dir, self.logs, conf_dir):
            os.makedirs(d)
        self.master_log = os.path.join(self.logs, "master.log")
        self.worker_log = os.path.join(self.logs, "worker.log")
        self.env = dict(os.environ, SPARK_HOME=spark_home, SPARK_LOCAL_IP=LOOPBACK,
                        SPARK_LOG_DIR=self.logs, SPARK_WORKER_DIR=self.work_dir,
                        SPARK_CONF_DIR=conf_dir,
                        # The REST submission server would listen on a fixed port (6066).
                        SPARK_MASTER_OPTS="-Dspark.master.rest.enabled=false")
        self.procs = []
        self.master_url = None
        self.worker = None

    def tails(self):
        return f"{_tail(self.master_log)}\n{_tail(self.worker_log)}"

    def _spawn(self, label, log, args):
        with open(log, "w") as f:
            proc = subprocess.Popen([os.path.join(self.spark_home, "bin", "spark-class"), *args],
                                    env=self.env, cwd=self.base, stdin=subprocess.DEVNULL,
                                    stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        self.watch.add(proc.pid, label)
        return proc

    def _wait_for(self, proc, log, pattern, what, deadline):
        while True:
            with open(log, errors="replace") as f:
                m = re.search(pattern, f.read(), re.M)
            if m:
                return m
            if proc.poll() is not None:
                pytest.fail(f"{what}: the process exited with status {proc.returncode}\n"
                            f"{self.tails()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not seen within {START_TIMEOUT}s\n{self.tails()}")
            time.sleep(0.2)

    def start(self):
        deadline = time.monotonic() + START_TIMEOUT
        port, ui_port, worker_ui_port = _free_ports(3)
        master = self._spawn("master", self.master_log, [
            "org.apache.spark.deploy.master.Master", "--host", LOOPBACK,
            "--port", str(port), "--webui-port", str(ui_port)])
        # Spark moves to the next port if the one asked for was taken meanwhile: take
        # the URL from the log.
        url = self._wait_for(master, self.master_log, r"Starting Spark master at (spark://\S+)",
                             "master start", deadline).group(1)
        self._wait_for(master, self.master_log, r"I have been elected leader", "master leader",
                       deadline)
        self.master_url = url
        worker = self.worker = self._spawn("worker", self.worker_log, [
            "org.apache.spark.deploy.worker.Worker", "--host", LOOPBACK, "--cores", "2",
            "--memory", "2g", "--webui-port", str(worker_ui_port), "--work-dir", self.work_dir,
            url])
        self._wait_for(worker, self.worker_log,
                       r"Successfully registered with master " + re.escape(url),
                       "worker registration", deadline)

    def stop(self):
        for proc in reversed(self.procs):  # worker (and its executors) first
            _stop_group(proc)
            self.watch.remove(proc.pid)

    def apps(self):
        return {d for d in os.listdir(self.work_dir) if d.startswith("app-")}

    def submit_args(self):
        return ["--master", self.master_url, "--conf", f"spark.driver.host={LOOPBACK}",
                "--conf", f"spark.driver.bindAddress={LOOPBACK}", "--executor-memory", "1g"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, watch):
    c = Cluster(str(tmp_path_factory.mktemp("cluster")), _spark_home(), watch)
    try:
        c.start()
        watch.poll()
        watch.assert_loopback_only()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory, watch):
    """The same training run with --master local[2], started before the cluster so that
    the two overlap (module runtime); test_train_on_the_cluster waits for it."""
    base = str(tmp_path_factory.mktemp("local"))
    out = os.path.join(base, "local")
    job = Job("local-run", ["--master", "local[2]", *TRAIN, "--output", out], base, watch)
    yield job, out
    job.kill()


@pytest.fixture(scope="module")
def local_gd_reference(tmp_path_factory, watch):
    """GD_TRAIN with --master local[2] (started by the first test that needs it, and
    running alongside it)."""
    base = str(tmp_path_factory.mktemp("local-gd"))
    out = os.path.join(base, "model")
    job = Job("local-gd", ["--master", "local[2]", *GD_TRAIN, "--output", out], base, watch)
    yield job, out
    job.kill()


def _load_model(path):
    import numpy as np

    with open(os.path.join(path, "metadata.json")) as f:
        meta = json.load(f)
    return (np.load(os.path.join(path, "coefficients.npy"), allow_pickle=False),
            np.load(os.path.join(path, "intercept.npy"), allow_pickle=False), meta)


# --------------------------------------------------------------------------- tests


def test_train_on_the_cluster(local_reference, cluster, watch, tmp_path):
    before = cluster.apps()
    out_dir = tmp_path / "model"
    job = Job("cluster-run", [*cluster.submit_args(), *TRAIN, "--output", str(out_dir)],
              str(tmp_path), watch).wait()
    assert job.proc.returncode == 0, job.describe() + "\n" + cluster.tails()
    assert "sparkgd: done:" in job.stdout, job.describe()
    for bad in ("Lost task", "Traceback", " ERROR "):
        assert bad not in job.stderr, job.describe()
    meta = json.loads((out_dir / "metadata.json").read_text())
    assert meta["numFeatures"] == 10
    assert meta["summary"]["numPartitions"] == 4

    # It really ran on the worker: the master launched an executor of a new application
    # there, and the executor's directory has its logs and the shipped sparkgd zip.
    new = sorted(cluster.apps() - before)
    assert len(new) == 1, f"expected one new application in {cluster.work_dir}, got {new}"
    app = new[0]
    with open(cluster.master_log, errors="replace") as f:
        master_log = f.read()
    assert f"Registered app sparkgd with ID {app}" in master_log, cluster.tails()
    assert re.search(rf"Launching executor {re.escape(app)}/\d+ on worker", master_log), \
        cluster.tails()
    app_dir = os.path.join(cluster.work_dir, app)
    executors = sorted(os.listdir(app_dir))
    assert executors, app_dir
    for e in executors:
        files = os.listdir(os.path.join(app_dir, e))
        assert {"stderr", "stdout"} <= set(files), (e, files)
        assert any(re.fullmatch(r"sparkgd-[0-9a-f]{16}\.zip", f) for f in files), (e, files)
        with open(os.path.join(app_dir, e, "stderr"), errors="replace") as f:
            text = f.read()
        assert "CoarseGrainedExecutorBackend" in text and "Traceback" not in text, text[-3000:]

    # ...and its Python workers were the venv's interpreter (spark.pyspark.python).
    with watch.lock:
        under_worker = list(watch.cmdlines.get("worker", {}).values())
    pythons = [a for a in under_worker if "pyspark.daemon" in a]
    assert pythons, f"no pyspark.daemon seen under the worker: {under_worker}"
    for argv in pythons:
        assert os.path.realpath(os.path.dirname(argv[0])) == os.path.realpath(VENV_BIN), argv

    # The model does not depend on where it ran.
    ref, ref_dir = local_reference
    ref.wait()
    assert ref.proc.returncode == 0, ref.describe()
    with open(os.path.join(ref_dir, "metadata.json")) as f:
        ref_meta = json.load(f)
    f_cluster = meta["summary"]["objectiveHistory"][-1]
    f_local = ref_meta["summary"]["objectiveHistory"][-1]
    assert abs(f_cluster - f_local) <= 1e-9 * abs(f_local), (f_cluster, f_local)

    # The watcher saw the daemons', the drivers' and the executor's sockets.
    with watch.lock:
        labels = {x[0] for x in watch.listeners}
    assert {"master", "worker", "cluster-run", "local-run"} <= labels, watch.listeners
    watch.assert_loopback_only()


def test_missing_data_on_the_cluster_is_one_line_exit_2(cluster, watch, tmp_path):
    before = cluster.apps()
    out_dir = tmp_path / "out"
    job = Job("cluster-error", [*cluster.submit_args(), "jobs/train.py", "--data", "/nonexistent",
                                "--output", str(out_dir)], str(tmp_path), watch).wait()
    assert job.proc.returncode == 2, job.describe()
    lines = job.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparkgd: error:"), job.describe()
    assert "/nonexistent" in lines[0]
    assert not out_dir.exists()
    # Checked before Spark starts: no application reached the cluster.
    assert cluster.apps() == before
    watch.assert_loopback_only()


@pytest.mark.parametrize("phase", ["iteration", "build"])
def test_fit_survives_a_lost_executor(phase, local_gd_reference, cluster, watch, tmp_path):
    """SIGKILL the job's executor JVM half-way through the fit (``iteration``: once the
    progress line of iteration 10 is out; ``build``: while the blocks are being built).
    The worker launches a replacement executor. The tasks that held the blocks are gone,
    so the fit starts over on blocks Spark rebuilds through lineage (re-reading the
    input and redoing the repartition's lost shuffle output); it must end as if nothing
    happened: exit 0, all GD_ITERS iterations, the local run's model to 1e-9."""
    import numpy as np

    ref_job, ref_dir = local_gd_reference
    old_apps = cluster.apps()
    out_dir = tmp_path / "model"
    job = Job(f"cluster-kill-{phase}",
              [*cluster.submit_args(), *GD_TRAIN, "--output", str(out_dir)],
              str(tmp_path), watch)
    killed = _kill_executor(job, cluster, old_apps, phase, KILL_AT_ITER)
    app, lost = killed["app"], killed["executor"]
    replacements, to_new, to_iter = _after_kill(job, cluster, killed)
    job.wait()
    timeline = (f"{job.name}: SIGKILLed executor {app}/{lost} (pid {killed['pid']}) "
          f"{killed['at'] - job.started:.1f}s after submission, after iteration "
          f"{killed['iteration']}; replacement JVM {sorted(replacements)} seen after {to_new}s, "
          f"next iteration after {to_iter}s; job ended "
          f"{job.started + job.seconds - killed['at']:.1f}s after the kill "
          f"({job.seconds:.1f}s in all)")
    print("\n" + timeline)
    info = timeline + "\n" + job.describe() + "\n" + cluster.tails()

    # The fit completed, all of it, after the kill.
    assert job.proc.returncode == 0, info
    assert f"sparkgd: done: {GD_ITERS} iterations" in job.stdout, info
    # The fit went on from where it was: every iteration printed once, in order (the
    # passes before the loss were replayed from the driver's memory, not recomputed).
    iters = _iterations(job.out_path)
    assert iters == list(range(1, GD_ITERS + 1)), info
    if phase == "iteration":
        assert KILL_AT_ITER <= killed["iteration"] < GD_ITERS, (killed, info)
        # Spark reran the lost tasks (after redoing the shuffle output that died with the
        # executor): their new attempts built the very same blocks and took the lost ones'
        # places -- or, had they not been able to, a new job built them and the fit went
        # on from where it was. Never from the start.
        retried = "built the very blocks the lost attempt held" in job.stdout
        rebuilt = "building the blocks again" in job.stdout and \
            "continuing from iteration" in job.stdout
        assert retried or rebuilt, info
        assert "starts over" not in job.stdout, info
        print(f"{job.name}: " + ("the lost tasks' retries took their places" if retried
                                 else "the blocks were built again by a new job"))
    else:
        assert killed["iteration"] == 0, (killed, info)
    coef, intercept, meta = _load_model(str(out_dir))
    assert meta["summary"]["totalIterations"] == GD_ITERS, meta["summary"]

    # The executor really was lost (the driver saw it; the worker reported its exit to the
    # master) and replaced by a new one, on the same worker, which ran the rest.
    assert re.search(rf"Lost executor {lost}\b", job.stderr), info
    with open(cluster.worker_log, errors="replace") as f:
        worker_log = f.read()
    with open(cluster.master_log, errors="replace") as f:
        master_log = f.read()
    assert re.search(rf"Executor {re.escape(app)}/{lost} finished with state EXITED "
                     r"message Command exited with code 137", worker_log), info
    assert re.search(rf"Removing executor {re.escape(app)}/{lost} because it is EXITED",
                     master_log), info
    launched = re.findall(rf"Launching executor {re.escape(app)}/(\d+) on worker", master_log)
    assert lost in launched and len(set(launched)) >= 2, (launched, info)
    app_dir = os.path.join(cluster.work_dir, app)
    executors = sorted(os.listdir(app_dir), key=int)
    assert len(executors) >= 2 and lost in executors, (executors, info)
    for e in executors:
        if e != lost:  # the replacement fetched the job's files: it ran tasks
            files = os.listdir(os.path.join(app_dir, e))
            assert any(re.fullmatch(r"sparkgd-[0-9a-f]{16}\.zip", f) for f in files), (e, files)
    assert replacements, "no replacement executor JVM seen under the worker"

    # Same model as the undisturbed local run.
    ref_job.wait()
    assert ref_job.proc.returncode == 0, ref_job.describe()
    ref_coef, ref_intercept, ref_meta = _load_model(ref_dir)
    assert ref_meta["summary"]["totalIterations"] == GD_ITERS
    np.testing.assert_allclose(coef, ref_coef, rtol=1e-9, atol=0)
    np.testing.assert_allclose(intercept, ref_intercept, rtol=1e-9, atol=0)
    np.testing.assert_allclose(meta["summary"]["objectiveHistory"],
                               ref_meta["summary"]["objectiveHistory"], rtol=1e-9, atol=0)
    watch.assert_loopback_only()
