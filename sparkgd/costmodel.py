"""An alpha-beta-gamma model of one pass's time for each topology and codec. Pure NumPy.

A pass (:mod:`sparkgd.engine.collective`) sends theta to ``P`` tasks and brings back the
sum of their ``[loss, weight, grad (n)]``. Its time is modelled as the cost of what is
*serialized* on its slowest path (a task's local gradient, ``compute``, aside):

    time = alpha * messages + beta * bytes + gamma * adds
           + enc * encoded + dec * decoded + compute

with the :class:`Machine`'s prices -- ``alpha`` seconds a message (latency), ``beta``
seconds a byte on a link (inverse bandwidth), ``gamma`` seconds a float64 addition, and
per codec ``enc + dec = gamma_codec`` seconds a value encoded and decoded -- and the
counts of :func:`critical_path`, which depend on the topology alone. Every byte count
comes from :mod:`sparkgd.engine.collective` (``pass_bytes``, ``theta_bytes``,
``sums_bytes``, ``chunk_bytes``): the model prices the messages the engine sends.

Steady state by default: a lossy codec sends theta as a difference (``delta``, as
``pass_bytes`` assumes), encoded once by the driver and decoded once by every task.
A link carries one message at a time and each end handles its messages one after
another; distinct links run in parallel. Frame headers (80 bytes) are not counted,
as in ``pass_bytes``.

:func:`calibrate` measures the prices on this machine (loopback TCP, NumPy, the codecs);
:func:`cluster` keeps its gammas and takes alpha and beta from a link's latency and
speed. :func:`winners` gives the fastest (topology, codec) over a grid of ``(P, d)``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import socket
import statistics
import threading
import time

import numpy as np

from . import codecs
from .engine import collective

TOPOLOGIES = ("star", "tree", "ring")
DEFAULT_CODECS = ("none", "fp16", "topk:0.01", "qsgd:8")
TERMS = ("latency", "bandwidth", "reduce", "codec", "compute")


@dataclasses.dataclass(frozen=True)
class Machine:
    """Prices of the model (seconds).

    ``alpha``: a message (latency); ``beta``: a byte on one link (1 / bandwidth);
    ``gamma``: one float64 addition; ``gamma_codec``: codec name (``str(codec)``, or its
    family such as ``"topk"``) -> one value encoded *and* decoded (``none``: 0);
    ``gamma_decode``: the decoding part of it (missing: half), so that
    ``enc = gamma_codec - gamma_decode`` and ``dec = gamma_decode``."""

    alpha: float
    beta: float
    gamma: float
    gamma_codec: dict = dataclasses.field(default_factory=dict)
    gamma_decode: dict = dataclasses.field(default_factory=dict)

    def codec_prices(self, codec):
        """``codec`` -> (enc, dec): seconds a value encoded, decoded. KeyError for a
        lossy codec this machine has no price for."""
        codec = as_codec(codec)
        if not codec.lossy:
            return 0.0, 0.0
        for key in (str(codec), codec.name):
            if key in self.gamma_codec:
                both = float(self.gamma_codec[key])
                dec = float(self.gamma_decode.get(key, both / 2))
                return both - dec, dec
        raise KeyError(f"no gamma_codec for {codec}: calibrate with it "
                       f"(known: {sorted(self.gamma_codec)})")


def as_codec(codec):
    return codec if isinstance(codec, codecs.Codec) else codecs.parse(codec)


def link(gbit=10.0, latency_us=50.0):
    """A link of ``gbit`` Gbit/s and ``latency_us`` one way -> (alpha, beta):
    ``alpha = latency_us * 1e-6``, ``beta = 8 / (gbit * 1e9)`` seconds a byte."""
    return latency_us * 1e-6, 8.0 / (gbit * 1e9)


def cluster(link_gbit=10.0, latency_us=50.0, base=None):
    """``base`` (default: :func:`calibrate` without the network) with alpha and beta of
    :func:`link` instead of its own: this machine's arithmetic on a cluster's network."""
    base = calibrate(network=False) if base is None else base
    alpha, beta = link(link_gbit, latency_us)
    return dataclasses.replace(base, alpha=alpha, beta=beta)


# ----------------------------------------------------------------- what is serialized

@functools.lru_cache(maxsize=1 << 16)
def _critical_path(topology, p, n, codec, depth, delta):
    pb = collective.pass_bytes(topology, p, n, codec, depth, delta)
    driver = pb["driver_out"] + pb["driver_in"]
    coded = n if delta else 0                 # theta: the driver encodes, a task decodes
    if topology == "star":
        return {"messages": 2 * p, "bytes": driver, "adds": p * n,
                "encoded": coded + n, "decoded": coded + p * n, "pass_bytes": pb}
    if topology == "tree":
        f = collective.fan_in(p, depth)
        h = collective.tree_height(p, f)
        hop = collective.theta_bytes(codec, n, delta) + collective.sums_bytes(codec, n)
        return {"messages": 2 * (1 + h * f), "bytes": driver + h * f * hop,
                "adds": h * f * n, "encoded": coded + (h + 1) * n,
                "decoded": coded + (h * f + 1) * n, "pass_bytes": pb,
                "fan_in": f, "height": h}
    if topology == "ring":
        bounds = collective.chunk_bounds(n, p)
        m = bounds[1] - bounds[0]             # chunk 0: the longest, with the head
        step = (collective.theta_bytes(codec, m, delta)
                + collective.chunk_bytes(codec, 0, m))
        return {"messages": 2 * p + 2 * (p - 1), "bytes": driver + (p - 1) * step,
                "adds": (p - 1) * m, "encoded": coded + p * m,
                "decoded": coded + (p - 1) * m + n, "pass_bytes": pb, "chunk": m}
    raise ValueError(f"unknown topology {topology!r}; expected one of {TOPOLOGIES}")


def critical_path(topology, P, n, codec=codecs.NONE, depth=2, delta=None):
    """What one pass serializes on its slowest path -> ``{"messages", "bytes", "adds",
    "encoded", "decoded", "pass_bytes"}`` (counts; ``pass_bytes``: collective's dict),
    plus ``fan_in``/``height`` (tree) or ``chunk`` (ring).

    ``T = theta_bytes(codec, n, delta)`` and ``S = sums_bytes(codec, n)`` are the two
    whole messages, ``driver = pass_bytes driver_out + driver_in``, ``c = n`` when theta
    goes as a difference (``delta``) else 0:

    * star -- the driver's one link sends ``P`` thetas and receives ``P`` sums; it adds
      and decodes all ``P``; the tasks encode in parallel (one on the path)::

          messages = 2P        bytes = driver = P (T + S)        adds = P n
          encoded = c + n      decoded = c + P n

    * tree -- ``f = fan_in(P, depth)``, ``h = tree_height(P, f)``; one message each way
      with the driver (task 0; the others hear of a pass from their parent); theta goes
      down ``h`` levels, a parent sending its ``f`` children one after another; the
      sums come up ``h`` levels, a parent receiving ``f`` messages one after another,
      decoding and adding ``f`` vectors and encoding one (full levels: an upper bound
      for a last level only partly filled)::

          messages = 2 (1 + h f)   bytes = driver + h f (T + S) = (1 + h f)(T + S)
          adds = h f n             encoded = c + (h + 1) n    decoded = c + (h f + 1) n

    * ring -- ``m`` = the longest chunk (chunk 0 of ``chunk_bounds``, which also carries
      the head); the driver sends ``P`` theta chunks and receives ``P`` sums chunks
      (``driver`` bytes, all of theta and of the sums), and decodes all ``n``; the
      all-gather and the reduce-scatter take ``P - 1`` steps each, a step one chunk
      message per link (``Tm = theta_bytes(codec, m)``, ``Sm = chunk_bytes(codec, 0,
      m)``); a reduce-scatter step decodes, adds and re-encodes one chunk::

          messages = 2P + 2(P - 1)   bytes = driver + (P - 1)(Tm + Sm)
          adds = (P - 1) m           encoded = c + P m     decoded = c + (P - 1) m + n
    """
    codec = as_codec(codec)
    delta = codec.lossy if delta is None else bool(delta)
    path = _critical_path(topology, int(P), int(n), codec, int(depth), delta)
    return {**path, "pass_bytes": dict(path["pass_bytes"])}   # the cache's stays intact


# ----------------------------------------------------------------- time

def pass_breakdown(topology, P, n, codec, machine, depth=2, compute=0.0, delta=None):
    """Seconds of one pass by term -> ``{"latency", "bandwidth", "reduce", "codec",
    "compute"}``, from the counts of :func:`critical_path`::

        latency   = alpha * messages
        bandwidth = beta * bytes
        reduce    = gamma * adds
        codec     = enc * encoded + dec * decoded     (Machine.codec_prices)
        compute   = compute                           (the tasks' own pass, in parallel)
    """
    path = critical_path(topology, P, n, codec, depth, delta)
    enc, dec = machine.codec_prices(codec)
    return {"latency": machine.alpha * path["messages"],
            "bandwidth": machine.beta * path["bytes"],
            "reduce": machine.gamma * path["adds"],
            "codec": enc * path["encoded"] + dec * path["decoded"],
            "compute": float(compute)}


def pass_time(topology, P, n, codec, machine, depth=2, compute=0.0, delta=None):
    """Seconds of one pass: the sum of :func:`pass_breakdown`'s terms, i.e.
    ``alpha messages + beta bytes + gamma adds + enc encoded + dec decoded + compute``
    with the counts of :func:`critical_path` (see there, per topology)."""
    return sum(pass_breakdown(topology, P, n, codec, machine, depth, compute,
                              delta).values())


def winners(P_grid, d_grid, codecs_list, machine, depth=2, compute=0.0,
            topologies=TOPOLOGIES):
    """For each ``(P, d)`` of the grids the fastest ``(topology, codec)`` ->
    ``{(P, d): {"best": (topology, codec name), "seconds": t, "times": {(topology,
    codec name): t}}}`` (ties go to the first in ``topologies`` x ``codecs_list``)."""
    cs = [as_codec(c) for c in codecs_list]
    out = {}
    for P in P_grid:
        for d in d_grid:
            times = {(t, str(c)): pass_time(t, P, d, c, machine, depth, compute)
                     for t in topologies for c in cs}
            best = min(times, key=times.get)
            out[(int(P), int(d))] = {"best": best, "seconds": times[best], "times": times}
    return out


# ----------------------------------------------------------------- calibration

def _median_seconds(fn, budget, min_reps=3, max_reps=2000):
    """Median wall time of ``fn()`` over as many runs as ``budget`` seconds allow
    (at least ``min_reps``), after one untimed run."""
    fn()
    times, end = [], time.perf_counter() + budget
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() < end):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _recv_exact(sock, view):
    got = 0
    while got < len(view):
        k = sock.recv_into(view[got:])
        if not k:
            raise ConnectionError("loopback peer closed")
        got += k


def _loopback_pair():
    """A connected (client, server) pair of TCP sockets on 127.0.0.1, no Nagle."""
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        client = socket.create_connection(lsock.getsockname())
        server, _ = lsock.accept()
    for s in (client, server):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client, server


def measure_alpha(budget=0.5, size=8):
    """Loopback TCP ping-pong of ``size``-byte messages between two threads -> the
    median round trip / 2 (seconds a message)."""
    client, server = _loopback_pair()

    def echo():
        buf = bytearray(size)
        try:
            while True:
                _recv_exact(server, memoryview(buf))
                server.sendall(buf)
        except (ConnectionError, OSError):
            pass

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    msg, back = b"\x01" * size, memoryview(bytearray(size))

    def ping():
        client.sendall(msg)
        _recv_exact(client, back)

    try:
        for _ in range(20):
            ping()
        return _median_seconds(ping, budget, min_reps=50) / 2
    finally:
        client.close()
        thread.join(2)
        server.close()


def measure_beta(budget=1.0, nbytes=64 << 20):
    """A bulk transfer of ``nbytes`` over loopback TCP between two threads (the
    receiver acknowledges the last byte) -> median seconds / ``nbytes``."""
    client, server = _loopback_pair()
    payload = memoryview(bytes(nbytes))
    go, done = threading.Semaphore(0), threading.Event()

    def sink():
        buf = memoryview(bytearray(1 << 22))
        try:
            while True:
                go.acquire()
                if done.is_set():
                    return
                left = nbytes
                while left:
                    k = server.recv_into(buf[:min(left, len(buf))])
                    if not k:
                        return
                    left -= k
                server.sendall(b"\x00")
        except OSError:
            pass

    thread = threading.Thread(target=sink, daemon=True)
    thread.start()
    ack = memoryview(bytearray(1))

    def send():
        go.release()
        client.sendall(payload)
        _recv_exact(client, ack)

    try:
        return _median_seconds(send, budget, min_reps=3, max_reps=50) / nbytes
    finally:
        done.set()
        go.release()
        thread.join(2)
        client.close()
        server.close()


def measure_gamma(budget=0.3, n=1_000_000):
    """NumPy ``a += b`` on ``n`` float64 -> median seconds per value."""
    rng = np.random.default_rng(0)
    a, b = rng.random(n), rng.random(n)

    def add():
        np.add(a, b, out=a)

    return _median_seconds(add, budget) / n


def measure_codec(codec, budget=0.5, n=1_000_000):
    """``codecs.encode`` then ``codecs.decode`` of ``n`` values (a heavy-tailed
    gradient) -> (seconds per value encoded + decoded, seconds per value decoded)."""
    codec = as_codec(codec)
    if not codec.lossy:
        return 0.0, 0.0
    v = np.random.default_rng(1).standard_t(3, size=n) * 1e3
    data, _ = codecs.encode(codec, v, None, seed=(0,))
    enc = _median_seconds(lambda: codecs.encode(codec, v, None, seed=(0,)), budget / 2)
    dec = _median_seconds(lambda: codecs.decode(codec, data, n), budget / 2)
    return (enc + dec) / n, dec / n


def calibrate(seconds_budget=3.0, codecs_list=DEFAULT_CODECS, network=True):
    """A :class:`Machine` measured here, in about ``seconds_budget`` seconds:

    * alpha: loopback TCP ping-pong of 8-byte messages, median round trip / 2;
    * beta: a 64 MiB loopback transfer, median seconds / byte;
    * gamma: NumPy ``a += b`` on 1e6 float64, seconds / value;
    * gamma_codec / gamma_decode: ``codecs.encode`` + ``decode`` on 1e6 values, per
      value, for each lossy codec of ``codecs_list`` (keyed by ``str(codec)``).

    Below a 2 s budget the sizes shrink with it (1/16 at the least). Without
    ``network`` alpha and beta are NaN (set them with :func:`cluster`)."""
    scale = max(1 / 16, min(1.0, seconds_budget / 2.0))
    n = int(1_000_000 * scale)
    lossy = [c for c in (as_codec(c) for c in codecs_list) if c.lossy]
    shares = {"alpha": 0.15, "beta": 0.35} if network else {}
    rest = 1.0 - sum(shares.values())
    shares["gamma"] = rest * (0.2 if lossy else 1.0)
    shares["codecs"] = rest - shares["gamma"]
    alpha = beta = math.nan
    if network:
        alpha = measure_alpha(seconds_budget * shares["alpha"])
        beta = measure_beta(seconds_budget * shares["beta"], int((64 << 20) * scale))
    gamma = measure_gamma(seconds_budget * shares["gamma"], n)
    both, dec = {}, {}
    for c in lossy:
        both[str(c)], dec[str(c)] = measure_codec(c, seconds_budget * shares["codecs"]
                                                  / len(lossy), n)
    return Machine(alpha, beta, gamma, both, dec)
