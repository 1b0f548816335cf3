"""The driver's end of the serving tasks' sockets: rendezvous, requests, replies.

:class:`Hub` accepts the tasks of one serving job, sends every task the loss and
layout (OP_CONFIG) and theta (OP_SUMS), and reads their sums back in task order. It
never blocks on a peer: every socket is non-blocking and every peer has a deadline.

* Handshakes (:mod:`.wire`) run as small state machines in the same loop as the
  passes, so a stranger on the port -- idle, trickling a byte at a time, or sending
  garbage -- costs the pass nothing but a few microseconds of bookkeeping, and is
  dropped when its ``hello_seconds`` are up (or its first bytes are wrong).
* A task that stops reading theta, stalls mid-reply, or neither answers nor sends its
  heartbeat for ``deadline`` seconds is dropped: with blocks of its own (``strict``)
  that is :class:`TaskLost` (the fit starts over); with block files
  :class:`WorkersUnavailable` (the engine runs one Spark job per pass instead).
* A frame with a wrong MAC, sequence number or pass number, a second reply, an op a
  task may not send: the connection is dropped, as if the task were lost.

Everything dropped is counted in :attr:`Hub.rejected`. The hub knows nothing of
Spark: the job that runs the tasks (:class:`sparkgd.engine.jobs.ServingJob`) tells it
whether the job ended and how many tasks run.
"""
from __future__ import annotations

import json
import logging
import math
import os
import selectors
import socket
import time
from collections import OrderedDict, deque

import numpy as np

from .. import codecs
from . import collective as co
from . import seal, wire

log = logging.getLogger("sparkgd")

#: Seconds a peer may take to complete its hello.
HELLO_SECONDS = 30.0
#: Seconds a task may go without progress while the hub waits on it.
DEADLINE_SECONDS = 60.0
#: Handshakes in progress at once (at most; fewer where the process may open fewer
#: descriptors: :func:`pending_budget`); beyond that the oldest stranger is dropped.
MAX_PENDING = 1024
#: Connections accepted per round of the hub's loop: a flood of them cannot keep the
#: loop from the tasks' frames, which every round serves too.
ACCEPTS_PER_ROUND = 32
#: Seconds the listener rests after a round that took that many (a flood), while every
#: task is connected (only strangers can be waiting); none while a task is missing.
ACCEPT_PAUSE = 0.05
#: Largest small message a task sends (its address, why a link failed).
MAX_NOTE = 4096
#: Up to this many tasks, those of a tree that do not talk to the driver send it their
#: time after each pass (a frame header, for the summary's task-time skew); beyond, the
#: driver hears from task 0 alone and a tree's passes report no skew.
MAX_TIMED_TASKS = 64
#: Passes redone in a row over failed links between tasks before the topology is star.
MAX_PEER_FAILURES = 3


def _address(payload):
    """OP_ADDRESS -> [host, port], or None (the task cannot listen)."""
    try:
        a = json.loads(bytes(payload)).get("address")
    except (ValueError, AttributeError):
        raise wire.ProtocolError("an address that is not JSON") from None
    if a is None:
        return None
    if not (isinstance(a, list) and len(a) == 2 and isinstance(a[0], str) and
            isinstance(a[1], int) and 0 < a[1] < 65536 and len(a[0]) < 256):
        raise wire.ProtocolError(f"a bad address {a!r}")
    return a


_BUDGET = []


def pending_budget():
    """Handshakes a hub keeps in progress at once: :data:`MAX_PENDING`, or a quarter
    of the descriptors this process may open, whichever is fewer (the rest are for the
    tasks' connections, the Python workers and Spark itself). The soft
    ``RLIMIT_NOFILE`` is first raised to the hard one, where the system allows."""
    if not _BUDGET:
        limit = 1024
        try:
            import resource

            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
            if want > soft:
                try:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
                    soft = want
                except (ValueError, OSError):
                    pass
            limit = soft if soft != resource.RLIM_INFINITY else 1 << 16
        except ImportError:   # pragma: no cover - not a POSIX system
            pass
        _BUDGET.append(max(16, min(MAX_PENDING, limit // 4)))
    return _BUDGET[0]


class WorkersUnavailable(RuntimeError):
    """The cluster could not run every serving task at once (or they cannot reach the
    hub, or one stalled): passes must go another way."""


class SlotsShrank(WorkersUnavailable):
    """The cluster has fewer task slots now than the job has serving tasks (executors
    gone for good): no point waiting for them."""


class WorkersFailed(RuntimeError):
    """The serving job ended with an error (its message is the job's)."""


class Cancelled(RuntimeError):
    """The caller's job group or tag was cancelled while the fit ran."""


class TaskLost(RuntimeError):
    """A serving task that holds its own blocks went away (or a new attempt of it
    appeared) during the fit: what it contributed can no longer be vouched for."""


def driver_address(sc):
    """-> (address to bind, address tasks connect to)."""
    conf = sc.getConf()
    host = conf.get("spark.driver.host", None) or socket.gethostname()
    bind = conf.get("spark.driver.bindAddress", None) or host
    return bind, host


#: Spark conf: the port (or ``first-last`` range) hubs bind on the driver; default any.
PORTS_CONF = "spark.sparkgd.hub.ports"


def parse_ports(text):
    """``""`` -> [0] (any free port); ``"40000"`` or ``"40000-40100"`` -> those ports."""
    text = (text or "").strip()
    if not text:
        return [0]
    lo, _, hi = text.partition("-")
    try:
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"{PORTS_CONF} must be a port or a range first-last, got {text!r}") \
            from None
    if not 0 < lo <= hi < 65536:
        raise ValueError(f"{PORTS_CONF} must be a port or a range first-last, got {text!r}")
    return list(range(lo, hi + 1))


class _Peer:
    """One accepted connection: a handshake in progress, or a task."""

    def __init__(self, sock, now, hello_seconds, key, share):
        self.sock = sock
        self.greeting = wire.Greeting(key, share)
        self.conn = None                # the sealed frames, once the hello opened
        self.index = self.attempt = None
        self.hello = True
        self.proved = False             # its hello's head opened: it holds the fit's key
        self.stage = "head"             # hello: head, body; task: head (prefix), payload
        self.inbound = wire.Inbound(wire.HELLO_HEAD_BYTES)
        self.prefix = None
        self.out = deque()              # memoryviews still to send
        self.progress = now             # last byte moved either way
        self.hello_deadline = now + hello_seconds
        self.closed = False
        self.close_when_sent = False
        self.bound = wire.FIRST_FRAME   # the largest payload the task takes now
        self.queue(self.greeting.challenge())

    def queue(self, *parts):
        self.out.extend(memoryview(p).cast("B") for p in parts if len(p))

    def frame(self, op, payload=b"", **fields):
        """Queue a sealed frame; one larger than the task takes yet goes after an
        OP_LIMIT frame that raises its bound (sealed: nobody else can raise it)."""
        size = sum(wire.as_bytes(p).nbytes for p in payload) if isinstance(payload, list) \
            else wire.as_bytes(payload).nbytes
        if size > self.bound:
            self.queue(*self.conn.frame(wire.OP_LIMIT, iteration=size))
            self.bound = size
        self.queue(*self.conn.frame(op, payload, **fields))

    def flush(self, now):
        """Send what the socket takes now; -> True when nothing is left."""
        if not self.out:
            return True
        before = sum(len(v) for v in self.out)
        rest = wire.send_some(self.sock, list(self.out))
        if sum(len(v) for v in rest) < before:
            self.progress = now
        self.out = deque(rest)
        return not self.out


class _Ssp:
    """One mode=async run on a hub: every task's clock, the requests out, the times."""

    def __init__(self, server, staleness, max_clock, num_tasks, start=0):
        self.server = server
        self.staleness, self.max_clock = int(staleness), int(max_clock)
        self.clocks = [int(start)] * int(num_tasks)
        self.outstanding = {}     # task -> (request number, clock, theta it was sent)
        self.done = int(start)    # clocks every task has pushed
        self.pushes = 0
        self.seconds = {}         # clock -> {task: seconds its computation took}
        self.finished = self.done >= self.max_clock


def skews(seconds, num_tasks):
    """Per pass (or clock) every task timed: slowest / median task time."""
    out = []
    for key in sorted(seconds):
        times = seconds[key]
        if len(times) == num_tasks and num_tasks > 0:
            med = float(np.median(list(times.values())))
            out.append(max(times.values()) / med if med > 0 else 1.0)
    return out


class Hub:
    """The driver's end of one serving job's sockets.

    ``ended()`` raises if the tasks' job is over, ``running()`` says how many tasks
    run (both asked only while waiting), ``failed()`` how many attempts failed.
    ``expected``: per task index, the sorted block keys it must report (None: not
    checked). ``strict``: a lost task or a second attempt of one raises TaskLost
    instead of being waited for (tasks that built their own blocks: see ServedJob).
    """

    def __init__(self, num_tasks, size, bind, ended, running, wait_seconds=30.0,
                 expected=None, strict=False, failed=None, deadline=DEADLINE_SECONDS,
                 hello_seconds=HELLO_SECONDS, ports=(0,), slots=None, secret=None):
        self.num_tasks, self.size = int(num_tasks), int(size)
        self._slots = slots           # -> the task slots the cluster has now (or None)
        self.codec = self.theta_codec = codecs.NONE
        self.strict = strict
        self.expected = expected
        self.wait_seconds = float(wait_seconds)
        self.deadline = float(deadline)
        self.hello_seconds = float(hello_seconds)
        self._ended, self._running, self._failed = ended, running, failed
        self.secret = os.urandom(32) if secret is None else bytes(secret)   # the fit's key
        self._share = seal.Share()    # the hub's X25519 share: every connection's keys
        self.facts = {}               # task index -> the facts bytes of its hello
        self.floats = {}              # task index -> the float64 array of its hello
        self.columns = {}             # task index -> the columns its rows touch (sparse)
        self._positions = {}          # task index -> where they sit in the fit's columns
        self.width = 0                # the fit's columns, once set_columns said so
        self.refused = 0              # tasks refused for reporting other blocks
        self.rejected = 0             # connections dropped: strangers, bad frames, stalls
        self.reconnects = 0
        self.short = False            # gave up waiting for task slots
        self.pass_no = 0
        self.topology, self.depth = "star", 2
        self.addresses = {}           # task index -> [host, port] it listens on for tasks
        self.epoch = 0
        self.peer_failures = 0        # passes redone after a link between tasks failed
        self.stale = 0                # replies to a pass already redone (ignored)
        self.bytes_out = self.bytes_in = self.peer_bytes = 0   # payload bytes, every pass
        self.last_bytes = {"driver_out": 0, "driver_in": 0, "peers": 0}
        self._peers_current = False   # the tasks know this epoch's topology and addresses
        self._failures_in_row = 0
        self.fell_back = False        # links between tasks failed: star for good
        self._started = False         # the pass in progress was sent (this epoch)
        self._abandoned = set()       # pass numbers sent, then redone (replies ignored)
        self._held = None             # the theta every task in _holders holds
        self._holders = set()
        self._candidate = None        # the theta the pass in progress computes at
        self._sent_to = set()         # tasks the pass in progress was sent to
        self._counted = 0             # the last pass whose sums were used
        self._messages = None
        self._listener = wire.listen(bind, ports)
        self.port = self._listener.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._pending = {}            # handshakes in progress: socket -> peer
        self._strangers = OrderedDict()   # those not yet proved, oldest first
        self._paused = None           # the listener rests until then (a flood)
        self._next_sweep = 0.0
        self.max_pending = pending_budget()
        self._tasks = {}              # task index -> its peer
        self._seen = set()            # task indices ever accepted
        self._config = None           # (payload) of OP_CONFIG, sent to every new task first
        self._replies = {}
        self._awaiting = set()
        self._request = None          # the pass in progress: (theta, sample)
        self._ssp = None              # mode=async: the run in progress (:class:`_Ssp`)
        self.rejected_pushes = 0      # async pushes not applied: duplicated or unasked for
        self.task_seconds = {}        # pass -> {task: seconds its computation took}

    # ------------------------------------------------------------------ the passes

    def wait_for_tasks(self):
        self._wait(lambda: len(self._tasks) < self.num_tasks)
        if self.strict:
            # a task Spark failed (its input broke upstream) may still have connected,
            # its Python side unaware: if the driver already knows, stop here
            self._ended()
            if self._failed is not None and self._failed() > 0:
                raise WorkersFailed("a task failed while the blocks were built")

    def expect(self, size, codec, theta_codec=codecs.NONE):
        """Replies from now on: ``size`` float64 sums, the gradient part (all but the
        first two) encoded with ``codec``; theta sent with ``theta_codec`` (lossy: as
        the difference from what the tasks hold)."""
        self.size, self.codec, self.theta_codec = int(size), codec, theta_codec

    def set_topology(self, topology, depth=2):
        """How the tasks combine a pass from now on (:mod:`.collective`)."""
        if topology not in co.TOPOLOGIES:
            raise ValueError(f"unknown topology {topology!r}")
        if self.fell_back:
            return
        if (topology, int(depth)) != (self.topology, self.depth):
            self.topology, self.depth = topology, int(depth)
            self._peers_current = False

    @property
    def reply_bytes(self):
        """The largest reply: a whole message of sums."""
        return co.sums_bytes(self.codec, self.size - 2)

    def _reply_size(self, i):
        n = self.size - 2
        if self.topology in ("star", "tree"):     # a tree: task 0's, the only reply
            return co.sums_bytes(self.codec, n)
        b = co.chunk_bounds(n, self.num_tasks)
        c = co.ring_final_chunk(i, self.num_tasks)
        return co.chunk_bytes(self.codec, b[c], b[c + 1])

    def _reply_ok(self, i, size):
        """Whether a reply of ``size`` bytes can be task ``i``'s for this pass: the
        codec's size, or (exact sums, star and tree) their sparse form."""
        if self.topology != "ring" and not self.codec.lossy:
            return co.exact_size_ok(size, self.size - 2)
        return size == self._reply_size(i)

    def _decode(self, i, payload):
        """Task ``i``'s reply -> its float64 sums (a ring task: its chunk's totals)."""
        if not len(payload):
            return None
        if self.codec.name == "none" and self.topology == "ring":
            return np.frombuffer(payload, dtype="<f8")
        n = self.size - 2
        if self.topology == "ring":
            b = co.chunk_bounds(n, self.num_tasks)
            c = co.ring_final_chunk(i, self.num_tasks)
            return co.unpack_sums(payload, self.codec, b[c + 1] - b[c], with_head=(c == 0))
        return co.unpack_sums(payload, self.codec, n)

    def set_columns(self, positions, width):
        """Sparse data: tell every task where each column its rows touch sits among the
        fit's ``width`` columns (``positions``: task index -> int64 array, aligned with
        the columns it reported); a task that connects later is told first thing."""
        self._positions = {i: np.ascontiguousarray(p, dtype="<i8")
                           for i, p in positions.items()}
        self.width = int(width)
        for i, peer in list(self._tasks.items()):
            peer.frame(wire.OP_COLUMNS, self._positions[i], iteration=self.width)
            self._push(peer)

    def configure(self, config):
        """Send every task the loss and layout to compute with (OP_CONFIG, JSON); a
        task that connects later gets it first."""
        self._config = json.dumps(config).encode()
        self._held, self._holders = None, set()     # the tasks forget theta too
        for peer in list(self._tasks.values()):
            peer.frame(wire.OP_CONFIG, self._config)
            self._push(peer)

    def evaluate(self, theta, sample=None):
        """The sums for ``theta``: star, every task's in task order; tree and ring, one
        vector, the total (:mod:`.collective`). ``last_bytes``: what the pass moved."""
        theta = np.ascontiguousarray(theta, dtype="<f8")
        before = (self.bytes_out, self.bytes_in, self.peer_bytes)
        self._request = (theta, sample)
        self._started = False
        try:
            self._try_start()
            self._wait(lambda: not self._started or bool(self._awaiting))
        finally:
            self._request = None
        # star: a task that reconnected after this pass was sent to it holds nothing;
        # tree and ring: a pass completes only with every task holding its theta
        self._held = self._candidate
        self._holders = set(self._sent_to) if self.topology == "star" else \
            set(range(self.num_tasks))
        self._counted = self.pass_no
        self._failures_in_row = 0
        self.last_bytes = {"driver_out": self.bytes_out - before[0],
                           "driver_in": self.bytes_in - before[1],
                           "peers": self.peer_bytes - before[2]}
        if self.topology == "star":
            return [self._replies[i] for i in range(self.num_tasks)]
        if self.topology == "tree":
            return [self._replies[0]]
        total = np.empty(self.size)
        b = co.chunk_bounds(self.size - 2, self.num_tasks)
        for i in range(self.num_tasks):
            c, part = co.ring_final_chunk(i, self.num_tasks), self._replies[i]
            if c == 0:
                total[:2], part = part[:2], part[2:]
            total[2 + b[c]:2 + b[c + 1]] = part
        return [total]

    def _try_start(self):
        """Send the pass in progress, unless it is out already or cannot be yet (tree
        and ring: until every task is connected and listening)."""
        if self._ssp is not None:
            self._ssp_dispatch()
            return
        if self._request is None or self._started:
            return
        theta = self._request[0]
        if self.topology != "star":
            if len(self._tasks) < self.num_tasks or \
                    any(i not in self.addresses for i in range(self.num_tasks)):
                return
            if any(not self.addresses[i] for i in range(self.num_tasks)):
                log.warning("a serving task cannot listen for other tasks; they "
                            "send to the driver directly (topology star)")
                self.topology, self._peers_current, self.fell_back = "star", False, True
        if not self._peers_current:
            self._new_epoch()
        self.pass_no += 1
        self._replies = {}
        # a tree's pass goes to task 0 alone and comes back from it, whole
        self._awaiting = {0} if self.topology == "tree" else set(range(self.num_tasks))
        self._messages = self._theta_messages(theta)
        self._sent_to = set()
        self._started = True
        for peer in list(self._tasks.values()):
            self._send_request(peer)

    def _new_epoch(self):
        """Tell every task the topology and where the others listen; theta goes in full
        to all at the next pass."""
        self.epoch += 1
        self._holders = set()
        config = {"topology": self.topology, "epoch": self.epoch, "counted": self._counted,
                  "num_tasks": self.num_tasks, "timed": self.num_tasks <= MAX_TIMED_TASKS,
                  "fan_in": co.fan_in(self.num_tasks, self.depth),
                  "addresses": [self.addresses.get(i) for i in range(self.num_tasks)]
                  if self.topology != "star" else []}
        payload = json.dumps(config).encode()
        for peer in list(self._tasks.values()):
            peer.frame(wire.OP_PEERS, payload)
            self._push(peer)
        self._peers_current = True

    def _theta_messages(self, theta):
        """-> what each task is sent for ``theta``, and (in ``_candidate``) the theta
        the tasks will compute at: theta itself, or, with a lossy codec, what the tasks
        hold plus the encoded difference (:func:`~.collective.pack_theta`)."""
        codec, n, p = self.theta_codec, theta.size, self.num_tasks
        if not codec.lossy:
            # exact theta: theta's own buffer goes out (nothing held, nothing copied)
            self._candidate = theta
            if self.topology == "star":
                return {"delta": co.full_theta(theta), "full": co.full_theta(theta)}
            if self.topology == "tree":
                return {0: co.full_theta(theta)}
            b = co.chunk_bounds(n, p)
            return {c: co.full_theta(theta[b[c]:b[c + 1]]) for c in range(p)}
        held = self._held if (codec.lossy and self._held is not None and
                              self._held.size == n) else None
        seed = (self.pass_no,)
        if self.topology == "star":
            delta, cand = co.pack_theta(theta, held, codec, seed)
            full = delta if held is None else co.pack_theta(cand, None, codec)[0]
            self._candidate = cand
            return {"delta": delta, "full": full}
        everyone = held is not None and self._holders >= set(range(p))
        if self.topology == "tree":
            msg, self._candidate = co.pack_theta(theta, held if everyone else None, codec, seed)
            return {0: msg}
        b = co.chunk_bounds(n, p)
        msgs, cand = {}, np.empty(n)
        for c in range(p):
            lo, hi = b[c], b[c + 1]
            msgs[c], cand[lo:hi] = co.pack_theta(theta[lo:hi], held[lo:hi] if everyone else
                                                 None, codec, seed + (c,))
        self._candidate = cand
        return msgs

    def _send_request(self, peer):
        if not self._started:
            return
        i = peer.index
        if i not in self._awaiting:
            return
        _, sample = self._request
        m = self._messages
        if self.topology == "star":
            payload = m["delta"] if i in self._holders else m["full"]
        else:
            payload = m.get(i, b"")
        fraction, seed, iteration = (1.0, 0, 0) if sample is None else sample
        peer.frame(wire.OP_SUMS, payload, pass_no=self.pass_no, iteration=iteration,
                   seed=seed, fraction=fraction)
        self.bytes_out += sum(wire.as_bytes(part).nbytes for part in payload) \
            if isinstance(payload, list) else len(payload)
        self._sent_to.add(i)
        peer.progress = time.monotonic()      # the deadline runs from the request
        self._push(peer)

    # ------------------------------------------------------------------ mode=async

    def run_async(self, server, staleness, max_clock):
        """Stale synchronous parallel: every task pulls theta, computes its sums and
        pushes them; ``server.push`` applies each push as it arrives; a task whose
        clock (pushes applied) is more than ``staleness`` ahead of the slowest's waits.

        ``server``: ``theta()`` (what a task is sent now), ``sample(i, clock) ->
        (fraction, seed, iteration)``, ``push(i, clock, sums, theta_read, seconds)``,
        ``clock_done(c) -> stop?`` (every task has pushed ``c`` times). Runs until
        every task has pushed ``max_clock`` times or ``clock_done`` says stop.

        A push is applied only when it answers the request outstanding on that task's
        connection: a duplicate, or an answer to anything else, is counted in
        :attr:`rejected_pushes` and dropped; a replayed frame fails its MAC sequence
        and drops the connection (:mod:`.wire`); a lost task's request is abandoned,
        and its next attempt is asked again at its clock. -> the :class:`_Ssp` run."""
        if self.topology != "star":       # pushes go to the server, on the driver
            self.topology, self._peers_current = "star", False
        before = (self.bytes_out, self.bytes_in)
        # a run started over (the file store rebuilt its blocks) goes on from the last
        # clock every task completed; what pushes beyond it reported is redone
        start = int(getattr(server, "clock", 0))
        if hasattr(server, "abandon_partial"):
            server.abandon_partial()
        self._ssp = _Ssp(server, staleness, max_clock, self.num_tasks, start)
        try:
            self._ssp_dispatch()
            self._wait(lambda: not self._ssp.finished)
        finally:
            ssp, self._ssp = self._ssp, None
            for pass_no, _, _ in ssp.outstanding.values():
                self._abandoned.add(pass_no)     # late answers are stale, not pushes
            ssp.outstanding.clear()
            self._holders = set()
            self._counted = self.pass_no
            self.last_bytes = {"driver_out": self.bytes_out - before[0],
                               "driver_in": self.bytes_in - before[1], "peers": 0}
        return ssp

    def _ssp_dispatch(self):
        """Ask every idle task that the staleness bound lets go for its next push."""
        ssp = self._ssp
        if ssp.finished:
            return
        if not self._peers_current:
            self._new_epoch()
        low = min(ssp.clocks)
        theta = payload = None
        for i, peer in sorted(self._tasks.items()):
            c = ssp.clocks[i]
            if i in ssp.outstanding or c >= ssp.max_clock or c - low > ssp.staleness:
                continue
            if theta is None:
                theta = np.array(ssp.server.theta(), dtype="<f8")   # its own copy
                payload = co.full_theta(theta)
            fraction, seed, iteration = ssp.server.sample(i, c + 1)
            self.pass_no += 1
            peer.frame(wire.OP_SUMS, payload, pass_no=self.pass_no, iteration=iteration,
                       seed=seed, fraction=fraction)
            self.bytes_out += sum(wire.as_bytes(part).nbytes for part in payload)
            ssp.outstanding[i] = (self.pass_no, c + 1, theta)
            peer.progress = time.monotonic()
            self._push(peer)

    def _ssp_reply(self, peer, frame):
        ssp, i = self._ssp, peer.index
        self.bytes_in += len(frame.payload)
        asked = ssp.outstanding.get(i)
        if ssp.finished and asked is not None and asked[0] == frame.pass_no:
            self.stale += 1       # read in the round that ended the run: not applied
            return
        if asked is None or asked[0] != frame.pass_no:
            self.rejected_pushes += 1
            log.info("a push from task %d for request %d was not applied (%s)", i,
                     frame.pass_no, "a duplicate" if frame.pass_no <= self.pass_no
                     else "never asked for")
            return
        if not self._reply_ok(i, len(frame.payload)):
            raise wire.ProtocolError(f"task {i}: a push of {len(frame.payload)} bytes")
        sums = self._decode(i, frame.payload)
        del ssp.outstanding[i]
        _, clock, theta = asked
        seconds = float(frame.fraction)
        if not (math.isfinite(seconds) and seconds >= 0):
            seconds = None
        else:
            ssp.seconds.setdefault(clock, {})[i] = seconds
        ssp.server.push(i, clock, sums, theta, seconds)
        ssp.clocks[i] = clock
        ssp.pushes += 1
        low = min(ssp.clocks)
        while ssp.done < low and not ssp.finished:
            ssp.done += 1
            if ssp.server.clock_done(ssp.done) or ssp.done >= ssp.max_clock:
                ssp.finished = True
        self._ssp_dispatch()

    def _timed(self, pass_no, i, seconds):
        if pass_no > 0 and math.isfinite(seconds) and seconds >= 0:
            self.task_seconds.setdefault(pass_no, {})[i] = float(seconds)

    # ------------------------------------------------------------------ the loop

    def _wait(self, waiting):
        """Serve the selector until ``waiting()`` is false: handshakes, (re)connecting
        tasks, requests out, replies in, deadlines."""
        short_since = None
        while waiting():
            now = time.monotonic()
            if self._paused is not None and now >= self._paused and self._listener:
                self._paused = None
                self._sel.register(self._listener, selectors.EVENT_READ, None)
            wait = 0.1 if self._paused is None else max(0.0, min(0.1, self._paused - now))
            for key, mask in self._sel.select(timeout=wait):
                if key.data is None:
                    self._accept()
                    continue
                peer = key.data
                if peer.closed:       # dropped earlier in this round (a newer attempt)
                    continue
                if mask & selectors.EVENT_WRITE:
                    self._push(peer)
                if mask & selectors.EVENT_READ and not peer.closed:
                    self._read(peer)
            self._check_deadlines()
            self._try_start()
            if not waiting():
                break
            self._ended()
            if len(self._tasks) < self.num_tasks:
                running = self._running()
                # strict (served) jobs compute their input first, and upstream stages
                # count as running tasks too: until a served task connects, only a job
                # with nothing running at all is short of slots
                enough = running > 0 if self.strict and not self._seen else \
                    running >= self.num_tasks
                if enough:
                    short_since = None
                elif short_since is None:
                    short_since = time.monotonic()
                elif self._shrunk(short_since):
                    self.short = True
                    raise SlotsShrank(
                        f"the cluster has {self._slots_seen} task slots now, fewer than the "
                        f"{self.num_tasks} serving tasks")
                elif time.monotonic() - short_since > self.wait_seconds:
                    self.short = True
                    raise WorkersUnavailable(
                        f"only {running} of {self.num_tasks} serving tasks could run at "
                        f"once for {self.wait_seconds:g}s")

    #: Seconds short of slots before the cluster's own count of them is asked.
    SHRINK_GRACE = 2.0

    def _shrunk(self, short_since):
        """Short of running tasks for a while, and the cluster says it has fewer slots
        than tasks (Spark already knows executors are gone): waiting will not help."""
        if self._slots is None or time.monotonic() - short_since < self.SHRINK_GRACE:
            return False
        try:
            self._slots_seen = int(self._slots())
        except Exception:   # pragma: no cover - the question is only a shortcut
            return False
        return 0 < self._slots_seen < self.num_tasks

    def _accept(self):
        """Take up to :data:`ACCEPTS_PER_ROUND` new connections (the rest wait in the
        backlog for the next round). At :attr:`max_pending` handshakes in progress, the
        oldest stranger -- a connection that has not proved it holds the fit's key --
        makes room, in O(1); a connection that has proved it never does."""
        now = time.monotonic()
        for _ in range(ACCEPTS_PER_ROUND):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:   # e.g. out of file descriptors: shed a stranger, go on
                if self._strangers:
                    self._reject(self._strangers.popitem(last=False)[1],
                                 "descriptors ran out")
                return
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            while len(self._strangers) >= self.max_pending:
                self._reject(self._strangers.popitem(last=False)[1],
                             "too many handshakes at once")
            peer = _Peer(sock, now, self.hello_seconds, self.secret, self._share)
            self._pending[sock] = peer
            self._strangers[sock] = peer
            self._sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, peer)
            self._push(peer)
        # a full round: more are waiting -- a flood. With every task connected, only
        # strangers can be in the backlog: the listener rests a moment (the kernel holds
        # what comes meanwhile), so the tasks' frames, not the flood, get this process's
        # time. While a task is missing it may be in the backlog too: no rest.
        if len(self._tasks) < self.num_tasks:
            return
        if self._paused is None:
            self._sel.unregister(self._listener)
        self._paused = now + ACCEPT_PAUSE

    def _push(self, peer):
        """Send what can be sent; watch for writability only while something waits."""
        if peer.closed:
            return
        try:
            done = peer.flush(time.monotonic())
        except OSError:
            self._gone(peer, "connection reset")
            return
        if done and peer.close_when_sent:
            self._close(peer)
            return
        events = selectors.EVENT_READ | (0 if done else selectors.EVENT_WRITE)
        if self._sel.get_key(peer.sock).events != events:
            self._sel.modify(peer.sock, events, peer)

    def _read(self, peer):
        try:
            while not peer.closed and peer.inbound.fill(peer.sock):
                peer.progress = time.monotonic()
                if peer.hello:
                    self._hello_piece(peer)
                elif self._frame_piece(peer):
                    return    # a whole frame: the selector says when more is there
            if peer.inbound.got:
                peer.progress = time.monotonic()
        except EOFError:
            self._gone(peer, "connection closed")
        except OSError:
            self._gone(peer, "connection reset")
        except (wire.ProtocolError, ValueError, UnicodeDecodeError) as e:  # CodecError too
            self._gone(peer, str(e), bad=True)

    def _hello_piece(self, peer):
        if peer.stage == "head":
            size = peer.greeting.head(peer.inbound.buf)     # ProtocolError: a stranger
            peer.proved = True            # it holds the fit's key: never evicted
            self._strangers.pop(peer.sock, None)
            peer.index, peer.attempt = peer.greeting.index, peer.greeting.attempt
            peer.stage = "body"
            peer.inbound.expect(size)
            return
        keys, facts, floats, cols = peer.greeting.body(peer.inbound.buf)
        peer.conn = peer.greeting.conn()
        self._admit(peer, keys, facts, floats, cols)

    def _admit(self, peer, keys, facts, floats, cols=None):
        """A task proved it belongs to this fit: accept it, or refuse it."""
        i, attempt = peer.index, peer.attempt
        del self._pending[peer.sock]
        peer.hello = False
        peer.stage = "head"
        peer.inbound.expect(wire.PREFIX_BYTES)
        if not 0 <= i < self.num_tasks:
            self._refuse(peer, f"task index {i} out of range")
            return
        if self.strict and i in self._seen:
            if not self._vouched(i, facts, floats) or not (
                    (cols is None and self.columns.get(i) is None) or
                    (cols is not None and np.array_equal(cols, self.columns.get(i)))):
                self._refuse(peer, "a second attempt with other blocks")
                self._lost(i, attempt)
                return
            log.info("serving task %d (attempt %d) built the very blocks the lost "
                     "attempt held: the fit goes on", i, attempt)
        if self.expected is not None and keys != self.expected[i]:
            self.refused += 1
            log.info("serving task %d (attempt %d) refused: %d of %d blocks as expected",
                     i, attempt, len(set(keys) & set(self.expected[i])),
                     len(self.expected[i]))
            self._refuse(peer, "incomplete input")
            return
        old = self._tasks.get(i)
        if old is not None:           # a newer attempt of a task we still had
            self._close(old)
        if i in self._seen:
            self.reconnects += 1
            log.info("serving task %d reconnected (attempt %d)", i, attempt)
        self._seen.add(i)
        self.facts[i], self.floats[i], self.columns[i] = facts, floats, cols
        self._tasks[i] = peer
        self._holders.discard(i)
        self._sent_to.discard(i)
        self.addresses.pop(i, None)       # it says where it listens next
        peer.frame(wire.OP_ACCEPT, fraction=self.deadline / 4)   # the heartbeat interval
        if i in self._positions:          # (an attempt that came back: its blocks again)
            peer.frame(wire.OP_COLUMNS, self._positions[i], iteration=self.width)
        if self._config is not None:
            peer.frame(wire.OP_CONFIG, self._config)
        if self.topology != "star":
            # links are made anew (the pass in progress too, once it says where it listens)
            self._redo()
        elif self._peers_current:
            peer.frame(wire.OP_PEERS, json.dumps({"topology": "star"}).encode())
        self._push(peer)
        if self._request is not None and i in self._awaiting:
            self._send_request(peer)

    def _refuse(self, peer, why):
        log.debug("hub refused a task: %s", why)
        peer.frame(wire.OP_REJECT)
        peer.close_when_sent = True
        peer.hello_deadline = time.monotonic() + self.hello_seconds
        self._pending[peer.sock] = peer      # its deadline still runs until it is sent
        self._push(peer)

    def _frame_piece(self, peer):
        if peer.stage == "head":
            peer.prefix = bytes(peer.inbound.buf)
            rest = wire.parse_prefix(peer.prefix, max(self.reply_bytes, MAX_NOTE))[-1]
            peer.stage = "payload"
            peer.inbound.expect(rest)
            return False
        frame = peer.conn.open(peer.prefix, peer.inbound.buf)
        peer.stage = "head"
        peer.inbound.expect(wire.PREFIX_BYTES)
        i = peer.index
        if frame.op == wire.OP_ALIVE:
            if 0 < frame.pass_no <= self.pass_no:   # after a pass: how long it computed
                self._timed(frame.pass_no, i, frame.fraction)
            return True
        if frame.op == wire.OP_ADDRESS and len(frame.payload) <= MAX_NOTE:
            self.addresses[i] = _address(frame.payload)
            return True
        if frame.op in (wire.OP_REPLY, wire.OP_PEER_FAIL):
            if not 0 <= frame.iteration < wire.MAX_PAYLOAD * self.num_tasks:
                raise wire.ProtocolError(f"task {i}: {frame.iteration} bytes to other tasks")
        if frame.op == wire.OP_PEER_FAIL and len(frame.payload) <= MAX_NOTE:
            # ``seed``: the epoch whose link failed (an older one's news is stale)
            self.peer_bytes += frame.iteration
            if frame.seed == self.epoch and self.topology != "star" and \
                    self._peers_current:          # (not already being replaced)
                self._peer_failed(i, bytes(frame.payload).decode("utf-8", "replace"))
            else:
                self.stale += 1
            return True
        if frame.op == wire.OP_REPLY and frame.pass_no in self._abandoned:
            self.stale += 1                     # an answer to a pass since redone
            self.bytes_in += len(frame.payload)
            self.peer_bytes += frame.iteration
            return True
        if frame.op == wire.OP_REPLY and self._ssp is not None:
            self._ssp_reply(peer, frame)
            return True
        awaited = frame.pass_no == self.pass_no and self._started and i in self._awaiting
        if frame.op != wire.OP_REPLY or not awaited or \
                not self._reply_ok(i, len(frame.payload)):
            raise wire.ProtocolError(
                f"task {i}: op {frame.op} for pass {frame.pass_no} ({len(frame.payload)} "
                f"bytes) where pass {self.pass_no} is {'awaited' if i in self._awaiting else 'done'}")
        self._replies[i] = self._decode(i, frame.payload)    # CodecError: dropped
        self._timed(frame.pass_no, i, frame.fraction)
        self.bytes_in += len(frame.payload)
        self.peer_bytes += frame.iteration
        self._awaiting.discard(i)
        return True

    def _peer_failed(self, i, why):
        """A task's link to another failed mid-pass: hand out a new epoch and redo the
        pass; after ``MAX_PEER_FAILURES`` in a row with every task connected, the tasks
        send to the driver directly (star) for the rest of the fit."""
        self.peer_failures += 1
        log.info("pass %d redone: %s", self.pass_no, why)
        if len(self._tasks) == self.num_tasks:
            self._failures_in_row += 1
            if self._failures_in_row >= MAX_PEER_FAILURES and self.topology != "star":
                log.warning("links between serving tasks failed %d times in a row "
                            "(last: %s); the tasks send to the driver directly (topology "
                            "star) from now on", self._failures_in_row, why)
                self.topology, self.fell_back = "star", True
        self._redo()

    def _redo(self):
        """Hand out a new epoch, and send the pass in progress again (when it can be)."""
        if self._started:
            self._abandoned.add(self.pass_no)
        self._peers_current = self._started = False

    def _check_deadlines(self):
        now = time.monotonic()
        while self._strangers:            # oldest first: stop at the first still in time
            peer = next(iter(self._strangers.values()))
            if now <= peer.hello_deadline:
                break
            self._reject(peer, f"no hello within {self.hello_seconds:g}s")
        if now >= self._next_sweep:       # the proved ones (few), a few times a second
            self._next_sweep = now + 0.25
            for peer in [p for p in self._pending.values() if now > p.hello_deadline]:
                self._reject(peer, f"no hello within {self.hello_seconds:g}s")
        for i, peer in list(self._tasks.items()):
            if peer.closed or now - peer.progress <= self.deadline:
                continue
            if peer.out:
                why = "stopped reading"
            elif peer.inbound.mid_piece or peer.stage == "payload":
                why = "stalled mid-reply"
            elif (self._started and i in self._awaiting) or \
                    (self._ssp is not None and i in self._ssp.outstanding):
                why = "did not answer"
            else:
                continue
            self._gone(peer, f"{why} for {self.deadline:g}s", stalled=True)

    # ------------------------------------------------------------------ endings

    def _close(self, peer):
        if peer.closed:
            return
        peer.closed = True
        self._pending.pop(peer.sock, None)
        self._strangers.pop(peer.sock, None)
        if self._tasks.get(peer.index) is peer:
            del self._tasks[peer.index]
            if self._ssp is not None and peer.index in self._ssp.outstanding:
                # its push can no longer come: the task is asked again when it is back
                self._abandoned.add(self._ssp.outstanding.pop(peer.index)[0])
        try:
            self._sel.unregister(peer.sock)
        except (KeyError, ValueError):
            pass
        peer.sock.close()

    def _reject(self, peer, why):
        """A stranger (or a refused task) is dropped."""
        self.rejected += 1
        log.debug("hub dropped a connection: %s", why)
        self._close(peer)

    def _gone(self, peer, why, bad=False, stalled=False):
        """A connection ended or misbehaved; a task's loss is handled as such."""
        if peer.closed:           # already dropped (and counted) in this select round
            return
        is_task = not peer.hello and self._tasks.get(peer.index) is peer
        if bad or stalled or not is_task:
            self.rejected += 1
        self._close(peer)
        if not is_task:
            log.debug("hub dropped a connection: %s", why)
            return
        log.info("serving task %d: %s", peer.index, why)
        if stalled and not self.strict and self._listener is not None:
            raise WorkersUnavailable(f"serving task {peer.index} {why}")
        self._holders.discard(peer.index)
        self._sent_to.discard(peer.index)
        if self.topology != "star":     # the others' links to it are gone: redo the pass
            self._redo()
        if self.strict and not (bad or stalled):
            # its process died (an executor lost, say): Spark retries the task, and a new
            # attempt that built the very same blocks takes its place (:meth:`_vouched`);
            # if none can run, the job fails or the hub runs short of tasks (TaskLost)
            log.info("waiting for serving task %d's next attempt", peer.index)
            return
        self._lost(peer.index)

    def _vouched(self, i, facts, floats):
        """A new attempt of task ``i`` may stand in for the lost one only if it built
        the same blocks: its facts (rows, weight, labels, non-zeros...; all but the
        process id) and feature moments equal to the last bit. Then the lost attempt's
        input was complete too (Spark vouches for the new one when it ends), and every
        pass it answered stands."""
        try:
            old, new = json.loads(self.facts[i] or b"{}"), json.loads(facts or b"{}")
        except ValueError:
            return False
        for d in (old, new):
            d.pop("pid", None)
        return bool(old) and "error" not in old and old == new and \
            np.array_equal(self.floats.get(i), floats)

    def _lost(self, i, attempt=None):
        if self.strict and self._listener is not None:
            again = "" if attempt is None else f" (a new attempt, {attempt}, connected)"
            raise TaskLost(f"serving task {i} was lost{again}")

    def close(self):
        """Tell every connected task to stop; close the sockets."""
        listener, self._listener = self._listener, None   # no TaskLost while stopping
        if listener is None:
            return
        for peer in list(self._tasks.values()):
            peer.frame(wire.OP_STOP)
            try:
                peer.sock.setblocking(True)
                peer.sock.settimeout(1.0)
                while peer.out:
                    part = peer.out.popleft()
                    peer.sock.sendall(part)
            except OSError:
                pass
            self._close(peer)
        for peer in list(self._pending.values()):
            self._close(peer)
        self._sel.close()
        listener.close()
        if self.rejected:
            log.info("the hub dropped %d connection(s) or frame(s) that were not "
                     "this fit's tasks speaking its protocol", self.rejected)
