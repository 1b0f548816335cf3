"""./spark-submit.sh against a real Spark standalone cluster on loopback.

A module fixture starts a standalone master and two workers (1 core, 2 GiB each) from
the venv's own pyspark (``$SPARK_HOME/bin/spark-class``), bound to loopback on free
ports -- the master and worker 0 to 127.0.0.1, worker 1 to 127.0.0.2 (two hosts, as
Spark sees them: speculation needs that) -- with logs, work dir and an empty SPARK_CONF_DIR in a temp directory. It waits
until the master is up and the workers have registered, and at teardown stops exactly
the process groups it started. Jobs ask for both cores and wait for both executors
(``spark.cores.max``, ``spark.scheduler.minRegisteredResourcesRatio``). Then:

* a bad ``--data`` fails on the cluster as it does locally: exit 2, one
  ``sparkgd: error:`` line on stderr, no output directory, no application started;
* a fixed-step GD fit submitted with ``--master spark://...`` exits 0, built its blocks
  in two serving tasks, really ran in executors on the workers (the master launched
  them, the work dir has the app's executor directories with their logs and the
  shipped sparkgd zip and the unpacked environment, and their Python workers were
  ./env/bin/python: the run ships the venv as README's deployment section says, a
  .tar.gz through --archives), and saved the model of a ``--master local[2]`` run of
  the same command (to 1e-9) -- the model must not depend on where it ran; its wall
  time is the undisturbed time;
* the same fit survives losing a worker for good: the test SIGKILLs one worker's whole
  process group (daemon, executor, Python workers) while the blocks are being built,
  or once iteration 10 is printed. The driver learns at once that the executor is lost;
  the one surviving task slot serves all the rows in a new served job, and the fit goes
  on from the iteration it had reached (each iteration printed once) to the undisturbed
  model (1e-9), within the undisturbed time + the rebuild's time + 10 s. A new worker
  then takes the killed one's place for the next test;
* with spark.speculation on and every pass one Spark job whose task 0 is slowed, Spark
  runs speculative copies of it on the other host (seen in the event log), and the model
  is that of a local run without speculation.

Throughout, a watcher thread polls /proc and records every listening TCP socket of the
processes started here and of their descendants (driver, executors, Python workers):
all of them must be on the loopback addresses above. The jobs are run with SPARK_LOCAL_IP=127.0.0.1 in
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
#: Each worker's address, by index: worker 1 (VICTIM) on a second loopback address, so
#: that Spark sees two hosts -- it launches a speculative copy of a task only on another
#: host than the running attempt's (test_speculative_copies_change_nothing).
HOSTS = ("127.0.0.1", "127.0.0.2")
START_TIMEOUT = 60   # master up + worker registered
JOB_TIMEOUT = 240    # one spark-submit run
# Fixed-step gradient descent: deterministic, so a run that lost its executor half-way
# must still reach the model of an undisturbed local run. A pass on the sample through the
# serving tasks takes about a millisecond: enough iterations that the kill lands mid-fit.
GD_ITERS = 2000
GD_TRAIN = ["jobs/train.py", "--optimizer", "gd", "--step-size", "0.5", "--max-iter",
            str(GD_ITERS), "--tol", "0", "--partitions", "4"]
KILL_AT_ITER = 10
WORKERS = 2          # one core each
VICTIM = 1           # the worker whose executor (or all of it) the kill tests kill
BUILT = re.compile(r"sparkgd: blocks built by (\d+) tasks in ([0-9.]+) s")


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
            return sorted(x for x in self.listeners if x[3] not in HOSTS)

    def assert_loopback_only(self):
        bad = self.not_loopback()
        assert not bad, f"listening on something other than {HOSTS}: {bad}"


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


def _executors(table, worker_pids, old_apps=()):
    """The executor JVMs whose parent chain leads to one of ``worker_pids``, minus
    those of ``old_apps``: {pid: (app id, executor id)}."""
    def is_executor(pid):
        argv = table[pid][1] if pid in table else []
        return bool(argv) and os.path.basename(argv[0]) == "java" and EXECUTOR_CLASS in argv

    found = {}
    for pid, (ppid, argv) in table.items():
        # A child the executor JVM has just forked shows the JVM's command line until it
        # execs (a Python worker, jspawnhelper): never take that for the executor.
        if not is_executor(pid) or is_executor(ppid):
            continue
        if not any(_has_ancestor(table, pid, w) for w in worker_pids):
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


class _Progress:
    """The highest iteration in a job's stdout so far, read incrementally: the killed
    runs' time is compared with the undisturbed run's, so following them must cost next
    to no CPU (re-reading a growing log every 20 ms did cost some)."""

    def __init__(self, path):
        self.path, self.offset, self.rest, self.last = path, 0, "", 0
        self.first_at = None     # when the job's first line (the rows counted) was seen

    def __call__(self):
        with open(self.path, errors="replace") as f:
            f.seek(self.offset)
            chunk = f.read()
            self.offset = f.tell()
        if chunk and self.first_at is None:
            self.first_at = time.monotonic()
        lines = (self.rest + chunk).split("\n")
        self.rest = lines.pop()          # a line not yet ended
        for n in ITER_LINE.findall("\n".join(lines)):
            self.last = max(self.last, int(n))
        return self.last


def _kill_worker(job, cluster, old_apps, phase, kill_at):
    """Follow the driver's stdout and worker VICTIM's process tree; SIGKILL the worker,
    its executor of the job and all, when ``phase`` is reached:

    * ``iteration``: the progress line of iteration ``kill_at`` (or later) is out (the
      stdout is read every 20 ms, /proc scanned once it is);
    * ``build``: the executor has started its first Python worker (the first Python
      work of a fit is writing the blocks, mapInArrow) and no iteration has run yet
      (/proc scanned every 50 ms).

    Returns what was killed, when, and how far the fit was."""
    progress = _Progress(job.out_path)
    while True:
        done = progress()
        target = None
        if phase == "build" or done >= kill_at:
            table = _process_table()
            execs = _executors(table, {cluster.workers[VICTIM].pid}, old_apps)
            if phase == "iteration":
                assert len(execs) == 1, (execs, job.name)
                target = next(iter(execs))
            else:
                assert not done, f"iterations began before a Python worker was seen: {done}"
                for pid in execs:
                    if _python_workers(table, pid):
                        target = pid
        if target is not None:
            cluster.kill_worker(VICTIM)
            app, executor = execs[target]
            return {"pid": target, "app": app, "executor": executor, "at": time.monotonic(),
                    "iteration": done, "progress": progress}
        if job.proc.poll() is not None:
            pytest.fail(f"{job.name} ended (exit {job.proc.returncode}) before the worker was "
                        f"killed ({phase}); iterations seen: {done}\n{_tail(job.out_path)}\n"
                        f"{_tail(job.err_path)}")
        if time.monotonic() > job.deadline:
            job.kill()
            pytest.fail(f"{job.name}: {phase} not reached in {JOB_TIMEOUT}s\n"
                        f"{_tail(job.out_path)}\n{_tail(job.err_path)}")
        time.sleep(0.05 if phase == "build" else 0.02)


def _next_iteration(job, killed):
    """Seconds from the kill to the driver's next progress line (None if the job ended
    first); then stop following, and leave the CPU to the job."""
    progress = killed["progress"]
    while job.proc.poll() is None and time.monotonic() < job.deadline:
        if progress() > killed["iteration"]:
            return time.monotonic() - killed["at"]
        time.sleep(0.05)
    return None


# --------------------------------------------------------------------------- the cluster


class Cluster:
    def __init__(self, base, spark_home, watch):
        self.base, self.spark_home, self.watch = base, spark_home, watch
        self.work_dir = os.path.join(base, "work")
        self.logs = os.path.join(base, "logs")
        conf_dir = os.path.join(base, "conf")  # no spark-env.sh; the daemons' defaults:
        for d in (self.work_dir, self.logs, conf_dir):
            os.makedirs(d)
        # Spark's authentication on, as a production cluster has it: the daemons and every
        # job share this secret, and the workers hand it to their executors in the
        # environment (where the serving tasks derive the fit's key from it)
        self.secret = os.urandom(16).hex()
        with open(os.path.join(conf_dir, "spark-defaults.conf"), "w") as f:
            f.write(f"spark.authenticate true\nspark.authenticate.secret {self.secret}\n")
        self.master_log = os.path.join(self.logs, "master.log")
        self.env = dict(os.environ, SPARK_HOME=spark_home, SPARK_LOCAL_IP=LOOPBACK,
                        SPARK_LOG_DIR=self.logs, SPARK_WORKER_DIR=self.work_dir,
                        SPARK_CONF_DIR=conf_dir,
                        # The REST submission server would listen on a fixed port (6066).
                        SPARK_MASTER_OPTS="-Dspark.master.rest.enabled=false")
        self.procs = []
        self.master_url = None
        self.workers = []       # Popen of each worker now up, by index
        self.worker_logs = []   # every worker log, replaced workers' included
        self._spawned = 0

    def tails(self):
        return "\n".join(_tail(p) for p in [self.master_log, *self.worker_logs])

    def read_logs(self, *paths):
        text = []
        for path in paths:
            with open(path, errors="replace") as f:
                text.append(f.read())
        return "\n".join(text)

    def _spawn(self, label, log, args):
        host = args[args.index("--host") + 1]
        with open(log, "w") as f:
            proc = subprocess.Popen([os.path.join(self.spark_home, "bin", "spark-class"), *args],
                                    env=dict(self.env, SPARK_LOCAL_IP=host), cwd=self.base, stdin=subprocess.DEVNULL,
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
        port, ui_port = _free_ports(2)
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
        for index in range(WORKERS):
            self.workers.append(self._start_worker(deadline, index))

    def _start_worker(self, deadline, index):
        """One more one-core worker at ``HOSTS[index]``, registered with the master."""
        host = HOSTS[index % len(HOSTS)]
        n = self._spawned
        self._spawned += 1
        log = os.path.join(self.logs, f"worker-{n}.log")
        self.worker_logs.append(log)
        ui_port, = _free_ports(1)
        worker = self._spawn(f"worker-{n}", log, [
            "org.apache.spark.deploy.worker.Worker", "--host", host, "--cores", "1",
            "--memory", "2g", "--webui-port", str(ui_port), "--work-dir", self.work_dir,
            self.master_url])
        self._wait_for(worker, log,
                       r"Successfully registered with master " + re.escape(self.master_url),
                       "worker registration", deadline)
        return worker

    def kill_worker(self, index):
        """SIGKILL worker ``index``'s whole process group -- the worker daemon, its
        executors and their Python workers -- as if its machine had gone."""
        proc = self.workers[index]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self.watch.remove(proc.pid)

    def replace_worker(self, index):
        """A new worker in place of the killed worker ``index`` (for the next tests)."""
        if self.workers[index].returncode is not None:
            _stop_group(self.workers[index])
            self.workers[index] = self._start_worker(time.monotonic() + START_TIMEOUT, index)

    def stop(self):
        for proc in reversed(self.procs):  # worker (and its executors) first
            _stop_group(proc)
            self.watch.remove(proc.pid)

    def apps(self):
        return {d for d in os.listdir(self.work_dir) if d.startswith("app-")}

    def submit_args(self):
        # Both workers' executors registered before the first job (as a user does who
        # wants a served fit on all of the cluster): the layout, and so the rounding, is
        # that of the local[2] reference.
        return ["--master", self.master_url, "--conf", f"spark.driver.host={LOOPBACK}",
                "--conf", f"spark.driver.bindAddress={LOOPBACK}", "--executor-memory", "1g",
                "--conf", f"spark.cores.max={WORKERS}",
                "--conf", "spark.scheduler.minRegisteredResourcesRatio=1.0",
                "--conf", "spark.authenticate=true",
                "--conf", f"spark.authenticate.secret={self.secret}"]


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
def local_gd_reference(tmp_path_factory, watch, cluster):
    """GD_TRAIN with --master local[2], started with the cluster (it runs while the
    cluster starts and the first test runs)."""
    base = str(tmp_path_factory.mktemp("local-gd"))
    out = os.path.join(base, "model")
    job = Job("local-gd", ["--master", "local[2]", *GD_TRAIN, "--output", out], base, watch)
    yield job, out
    job.kill()


@pytest.fixture(scope="module")
def undisturbed(local_gd_reference, cluster, watch, tmp_path_factory):
    """GD_TRAIN on the cluster, nothing killed: the model and the wall time the runs
    that lose a worker are held to (from the first line on: the archive is unpacked by
    then). Run alone (after the local reference has ended) so that its time is not
    inflated by sharing the cores. It runs as README's deployment recipe says: the venv
    packed into a .tar.gz, shipped with --archives ...#env, and
    spark.pyspark.python=./env/bin/python for the executors."""
    ref, _ = local_gd_reference
    base = tmp_path_factory.mktemp("undisturbed")
    archive = _packed_env(base)          # (while the local reference runs)
    ref.wait()
    before = cluster.apps()
    out = base / "model"
    job = Job("cluster-run", [*cluster.submit_args(), "--archives", f"{archive}#env",
                              "--conf", "spark.pyspark.python=./env/bin/python",
                              *GD_TRAIN, "--output", str(out)], str(base), watch)
    job.first_at = _first_output(job)
    return job.wait(), out, sorted(cluster.apps() - before)


def _packed_env(directory):
    """README's packed venv (minus packages the executors never import, for the suite's
    time) as ``directory/sparkgd-env.tar.gz``: a .tar.gz, since Spark unpacks a plain
    .tar without execute bits."""
    archive = os.path.join(str(directory), "sparkgd-env.tar.gz")
    skip = ["pyspark", "matplotlib", "fontTools", "PIL", "pillow.libs", "pip", "setuptools",
            "_pytest", "pygments", "kiwisolver", "sklearn", "scikit_learn.libs", "diffprivlib"]
    subprocess.run(["tar", "-h", "-C", os.path.dirname(VENV_BIN), "-I", "gzip -1",
                    *[f"--exclude=lib/python3*/site-packages/{name}" for name in skip],
                    "-cf", archive, "bin", "lib", "pyvenv.cfg"], check=True, timeout=180)
    return archive


def _first_output(job):
    """When the job printed its first line (its rows counted): the fit's own time runs
    from there; what comes before is JVM and session start-up, whose time varies by
    seconds from run to run on a shared machine."""
    progress = _Progress(job.out_path)
    while progress.first_at is None and job.proc.poll() is None and \
            time.monotonic() < job.deadline:
        progress()
        time.sleep(0.05)
    return progress.first_at


def _load_model(path):
    import numpy as np

    with open(os.path.join(path, "metadata.json")) as f:
        meta = json.load(f)
    return (np.load(os.path.join(path, "coefficients.npy"), allow_pickle=False),
            np.load(os.path.join(path, "intercept.npy"), allow_pickle=False), meta)


# --------------------------------------------------------------------------- tests


def test_missing_data_on_the_cluster_is_one_line_exit_2(cluster, local_gd_reference, watch,
                                                        tmp_path):
    # (first, while the local reference run goes on: this one starts no application)
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


def test_train_on_the_cluster(undisturbed, local_gd_reference, cluster, watch):
    import numpy as np

    job, out_dir, new = undisturbed
    print(f"\n{job.name}: {GD_ITERS} gd iterations on the cluster in {job.seconds:.1f}s")
    assert job.proc.returncode == 0, job.describe() + "\n" + cluster.tails()
    assert "sparkgd: done:" in job.stdout, job.describe()
    for bad in ("Lost task", "Traceback", " ERROR "):
        assert bad not in job.stderr, job.describe()
    meta = json.loads((out_dir / "metadata.json").read_text())
    assert meta["numFeatures"] == 10
    assert meta["summary"]["numPartitions"] == 4
    # with Spark's authentication on (the cluster's setting) the passes were served over
    # the sealed wire, the fit's key derived from Spark's secret on both ends
    assert meta["summary"]["engine"] == "served, sealed"
    assert "the fit's key: derived from Spark's authentication secret" in job.stdout, \
        job.describe()

    # Two serving tasks, one on each worker's executor, built the blocks.
    assert [int(n) for n, _s in BUILT.findall(job.stdout)] == [WORKERS], job.describe()

    # It really ran on the workers: the master launched executors of a new application
    # there, and the executors' directories have their logs and the shipped sparkgd zip.
    assert len(new) == 1, f"expected one new application in {cluster.work_dir}, got {new}"
    app = new[0]
    with open(cluster.master_log, errors="replace") as f:
        master_log = f.read()
    assert f"Registered app sparkgd with ID {app}" in master_log, cluster.tails()
    assert re.search(rf"Launching executor {re.escape(app)}/\d+ on worker", master_log), \
        cluster.tails()
    app_dir = os.path.join(cluster.work_dir, app)
    executors = sorted(os.listdir(app_dir))
    assert len(executors) == WORKERS, (app_dir, executors)
    for e in executors:
        files = os.listdir(os.path.join(app_dir, e))
        assert {"stderr", "stdout"} <= set(files), (e, files)
        assert any(re.fullmatch(r"sparkgd-[0-9a-f]{16}\.zip", f) for f in files), (e, files)
        with open(os.path.join(app_dir, e, "stderr"), errors="replace") as f:
            text = f.read()
        assert "CoarseGrainedExecutorBackend" in text and "Traceback" not in text, text[-3000:]

        # the archive, unpacked by Spark in the executor's directory
        assert os.path.exists(os.path.join(app_dir, e, "env", "bin", "python")), (e, files)

    # ...and its Python workers ran the archive's interpreter (spark.pyspark.python), not
    # the venv's: every one started as ./env/bin/python in its executor's directory.
    with watch.lock:
        under_worker = [argv for label, table in watch.cmdlines.items()
                        if label.startswith("worker-") for argv in table.values()]
    pythons = [a for a in under_worker if "pyspark.daemon" in a]
    assert pythons, f"no pyspark.daemon seen under the worker: {under_worker}"
    for argv in pythons:
        assert argv[0] == "./env/bin/python", argv

    # The model does not depend on where it ran.
    ref, ref_dir = local_gd_reference
    assert ref.proc.returncode == 0, ref.describe()
    coef, intercept, _ = _load_model(str(out_dir))
    ref_coef, ref_intercept, ref_meta = _load_model(ref_dir)
    np.testing.assert_allclose(coef, ref_coef, rtol=1e-9, atol=0)
    np.testing.assert_allclose(intercept, ref_intercept, rtol=1e-9, atol=0)
    np.testing.assert_allclose(meta["summary"]["objectiveHistory"],
                               ref_meta["summary"]["objectiveHistory"], rtol=1e-9, atol=0)

    # The watcher saw the daemons', the drivers' and the executors' sockets.
    with watch.lock:
        labels = {x[0] for x in watch.listeners}
    assert {"master", "worker-0", "worker-1", "cluster-run", "local-gd"} <= labels, \
        watch.listeners
    watch.assert_loopback_only()


def _killed_run(name, cluster, watch, tmp_path, phase):
    """GD_TRAIN on the cluster, worker VICTIM SIGKILLed at ``phase``; the run followed
    to its end. Returns (job, killed, info)."""
    old_apps = cluster.apps()
    out_dir = tmp_path / "model"
    job = Job(name, [*cluster.submit_args(), *GD_TRAIN, "--output", str(out_dir)],
              str(tmp_path), watch)
    killed = _kill_worker(job, cluster, old_apps, phase, KILL_AT_ITER)
    to_iter = _next_iteration(job, killed)
    job.wait()
    killed["out"] = out_dir
    timeline = (f"{job.name}: SIGKILLed the worker of executor {killed['app']}/"
                f"{killed['executor']} (pid {killed['pid']}) {killed['at'] - job.started:.1f}s "
                f"after submission, after iteration {killed['iteration']}; next iteration "
                f"after {to_iter}s; job ended {job.started + job.seconds - killed['at']:.1f}s "
                f"after the kill ({job.seconds:.1f}s in all)")
    print("\n" + timeline)
    info = timeline + "\n" + job.describe() + "\n" + cluster.tails()

    # The fit completed, all of it, after the kill...
    assert job.proc.returncode == 0, info
    assert f"sparkgd: done: {GD_ITERS} iterations" in job.stdout, info
    # ...and went on from where it was: every iteration printed once, in order (the
    # passes before the loss were replayed from the driver's memory, not recomputed).
    assert _iterations(job.out_path) == list(range(1, GD_ITERS + 1)), info
    assert "starts over" not in job.stdout, info
    if phase == "iteration":
        assert KILL_AT_ITER <= killed["iteration"] < GD_ITERS, (killed, info)
    else:
        assert killed["iteration"] == 0, (killed, info)
    # The driver saw the executor go, and the master the worker.
    assert re.search(rf"Lost executor {killed['executor']}\b", job.stderr), info
    return job, killed, info


def _same_model(out_dir, ref_dir, info):
    """The model at ``out_dir`` is the undisturbed local run's (to 1e-9)."""
    import numpy as np

    coef, intercept, meta = _load_model(str(out_dir))
    assert meta["summary"]["totalIterations"] == GD_ITERS, meta["summary"]
    ref_coef, ref_intercept, ref_meta = _load_model(ref_dir)
    assert ref_meta["summary"]["totalIterations"] == GD_ITERS
    np.testing.assert_allclose(coef, ref_coef, rtol=1e-9, atol=0, err_msg=info[:2000])
    np.testing.assert_allclose(intercept, ref_intercept, rtol=1e-9, atol=0)
    np.testing.assert_allclose(meta["summary"]["objectiveHistory"],
                               ref_meta["summary"]["objectiveHistory"], rtol=1e-9, atol=0)


@pytest.mark.parametrize("phase", ["build", "iteration"])
def test_fit_survives_a_lost_worker(phase, undisturbed, local_gd_reference, cluster, watch,
                                    tmp_path):
    """SIGKILL a whole worker -- daemon, executor and Python workers: its machine is gone
    for good -- while the blocks are being built, or once iteration 10 is out. Spark
    knows at once that the executor is lost; the hub, short of a task, asks it how many
    slots there are, and on learning one (not two) does not wait out its 30 s: the one
    surviving worker's task takes over all the rows in a new served job (not block
    files, not one Spark job per pass), and the fit goes on from where it was to the
    undisturbed model (1e-9). Its wall time is at most the undisturbed run's + the
    rebuild's + 10 s (the issue's bound; the figures are printed)."""
    try:
        job, killed, info = _killed_run(f"cluster-kill-worker-{phase}", cluster, watch,
                                        tmp_path, phase)
        assert "serving with the slots there are" in job.stdout or \
            "building the blocks again" in job.stdout, info
        for fallback in ("building block files instead", "one Spark job per pass"):
            assert fallback not in job.stdout, info
        builds = [(int(n), float(sec)) for n, sec in BUILT.findall(job.stdout)]
        # the last build served all the rows with the one slot left
        assert builds and builds[-1][0] == 1, (builds, info)
        logs = cluster.read_logs(cluster.master_log)
        assert re.search(rf"Removing worker worker-\S+ on {HOSTS[VICTIM]}:", logs), info
        # no worker had a core to spare: the app never got a replacement executor
        launched = re.findall(rf"Launching executor {re.escape(killed['app'])}/(\d+) on", logs)
        assert len(launched) == WORKERS, (launched, info)

        # Wall time from the first line on (start-up varies by seconds from run to run
        # on a shared machine, and has nothing to do with the loss); both in full too.
        ref, _out, _apps = undisturbed
        assert ref.proc.returncode == 0, ref.describe()
        rebuild = builds[-1][1]
        fit = job.started + job.seconds - killed["progress"].first_at
        ref_fit = ref.started + ref.seconds - ref.first_at
        # against the undisturbed run of this same session (not a fixed time): the
        # loss may cost the rebuild and 10 s for noticing it (Spark's executor-lost event,
        # the slot count, the tasks reconnecting): the bound the recovery work set
        bound = ref_fit + rebuild + 10
        print(f"{job.name}: {fit:.1f}s from the first line ({job.seconds:.1f}s in all); "
              f"undisturbed {ref_fit:.1f}s ({ref.seconds:.1f}s); builds {builds} (tasks, s); "
              f"bound {ref_fit:.1f} + {rebuild:.1f} + 10 = {bound:.1f}s")
        assert fit <= bound, info

        _same_model(killed["out"], local_gd_reference[1], info)
        watch.assert_loopback_only()
    finally:
        cluster.replace_worker(VICTIM)


def test_an_encrypted_cluster_serves_over_the_sealed_wire(cluster, undisturbed, watch,
                                                          tmp_path, spark):
    """spark.authenticate + spark.network.crypto.enabled (Spark encrypts its RPC, the
    tasks' closures with it): the fit's key rides in the closure, the passes are served
    over sparkgd's sealed wire (not one Spark job each, as before), and the model is a
    local[2] session's, unencrypted, to 1e-12."""
    import numpy as np

    import sparkgd

    out = tmp_path / "model"
    job = Job("encrypted", [*cluster.submit_args(), "--conf",
                            "spark.network.crypto.enabled=true", "jobs/train.py",
                            "--reg-param", "0.01", "--tol", "1e-10", "--output", str(out)],
              str(tmp_path), watch).wait()
    assert job.proc.returncode == 0, job.describe() + "\n" + cluster.tails()
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["summary"]["engine"] == "served, sealed", job.describe()
    assert "the fit's key: random, in the tasks' closure (Spark encrypts it)" in job.stdout
    coef, intercept, _ = _load_model(str(out))
    ref = sparkgd.LogisticRegression(regParam=0.01, tol=1e-10).fit(
        spark.read.parquet(os.path.join(ROOT, "data", "sample")))
    np.testing.assert_allclose(coef, ref.coefficients, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(intercept, ref.intercept, rtol=1e-12, atol=1e-14)
    watch.assert_loopback_only()


SPEC_ITERS = 6
SPEC_TRAIN = ["jobs/train.py", "--optimizer", "gd", "--step-size", "0.5", "--max-iter",
              str(SPEC_ITERS), "--tol", "0", "--partitions", "4"]


def _speculative(events_dir, event_name="SparkListenerTaskStart"):
    """(stage, task index, host) of every speculative task attempt in the event log that
    started (``SparkListenerTaskStart``), or that ended successfully
    (``SparkListenerTaskEnd``)."""
    out = []
    paths = [os.path.join(root, name) for root, _dirs, names in os.walk(events_dir)
             for name in names if not name.startswith(".")]
    for path in paths:
        with open(path, errors="replace") as f:
            for line in f:
                if f'"{event_name}"' not in line:
                    continue
                event = json.loads(line)
                info = event["Task Info"]
                if not info.get("Speculative"):
                    continue
                if event_name == "SparkListenerTaskEnd" and (
                        event.get("Task End Reason", {}).get("Reason") != "Success" or
                        info.get("Failed") or info.get("Killed")):
                    continue
                out.append((event["Stage ID"], info["Index"], info["Host"]))
    return out


def test_speculative_copies_change_nothing(cluster, watch, tmp_path):
    """spark.speculation on, every pass one Spark job (spark.sparkgd.store=jobs), the first
    attempt of task 0 of each pass slowed 40x (spark.sparkgd.testing.slowTask): Spark
    launches speculative copies of it on the other worker's host, which finish first --
    the event log shows them start and succeed -- and the model is a local[2] run's of
    the same command, without speculation, to 1e-9. (Passes served
    by long-lived tasks have no speculative copies: their tasks end together, at the
    fit's end.)"""
    import numpy as np

    ref_out, out = tmp_path / "reference", tmp_path / "model"
    events = tmp_path / "events"
    events.mkdir()
    # (the reference first: run beside the cluster's job it slows both of a pass's tasks
    # alike, and Spark then finds fewer to speculate on -- 2 attempts in 4 passes, against
    # 21 in 6 alone)
    ref = Job("speculation-reference", ["--master", "local[2]", *SPEC_TRAIN, "--output",
                                        str(ref_out)], str(tmp_path), watch).wait()
    job = Job("speculation", [
        *cluster.submit_args(), "--conf", "spark.speculation=true",
        "--conf", "spark.speculation.interval=20ms", "--conf", "spark.speculation.quantile=0.5",
        "--conf", "spark.speculation.multiplier=1.5",
        "--conf", "spark.speculation.minTaskRuntime=50ms",
        # (Spark 3.4+ otherwise spares a task whose input went fast however long it runs)
        "--conf", "spark.speculation.efficiency.enabled=false",
        "--conf", "spark.sparkgd.store=jobs", "--conf", "spark.sparkgd.testing.slowTask=0:40",
        "--conf", "spark.eventLog.enabled=true", "--conf", f"spark.eventLog.dir=file://{events}",
        "--conf", "spark.eventLog.compress=false", "--conf", "spark.eventLog.rolling.enabled=false",
        *SPEC_TRAIN, "--output", str(out)], str(tmp_path), watch).wait()
    assert ref.proc.returncode == 0, ref.describe()
    info = job.describe() + "\n" + cluster.tails()
    assert job.proc.returncode == 0, info
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["summary"]["engine"] == "jobs", meta["summary"]["engine"]
    speculative = _speculative(str(events))
    won = _speculative(str(events), "SparkListenerTaskEnd")
    print(f"\n{job.name}: {len(speculative)} speculative task attempts, {len(won)} of them "
          f"successful, on hosts {sorted({h for _s, _i, h in speculative})}, in "
          f"{job.seconds:.1f}s")
    assert speculative, "no speculative task attempt in the event log\n" + info
    # the slowed task's copies (only its first attempt sleeps) finish first: the passes'
    # sums came from speculative attempts
    assert 0 in {i for _s, i, _h in won}, (speculative, won)

    coef, intercept, _ = _load_model(str(out))
    ref_coef, ref_intercept, ref_meta = _load_model(str(ref_out))
    np.testing.assert_allclose(coef, ref_coef, rtol=1e-9, atol=0)
    np.testing.assert_allclose(intercept, ref_intercept, rtol=1e-9, atol=0)
    np.testing.assert_allclose(meta["summary"]["objectiveHistory"],
                               ref_meta["summary"]["objectiveHistory"], rtol=1e-9, atol=0)
    watch.assert_loopback_only()
