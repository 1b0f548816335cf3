"""What a serving task does with the hub's frames, until the driver says stop.

* OP_CONFIG: the loss, the layout and the codec to compute and send with;
* OP_PEERS: the topology of this epoch and where the other tasks listen (:mod:`.peers`);
* OP_SUMS: one pass. Theta arrives (from the hub, or from another task,
  :mod:`.collective` says which), :func:`sparkgd.kernels.partition_sums` computes this
  task's ``[loss_sum, weight_sum, grad...]``, and the sums go where the topology sends
  them; every task then answers the hub (OP_REPLY), with the sums if they go there.

A heartbeat (OP_ALIVE) goes to the hub, and up the task's outgoing link, while a pass
computes, so a slow pass is told from a dead task. When a link to another task fails,
the task closes all its links and says so (OP_PEER_FAIL): the hub redoes the pass.
"""
from __future__ import annotations

import json
import select
import threading
import time

import numpy as np

from .. import codecs, kernels
from ..data.arrow import remap_columns
from . import collective as co
from . import peers, wire


class _Heartbeat:
    """While a pass computes, an OP_ALIVE frame every ``interval`` seconds to the hub
    and up this task's outgoing link."""

    def __init__(self, chan, links):
        self.chan, self.links = chan, links
        self.busy = threading.Event()
        self.done = threading.Event()
        self.thread = None
        if chan.heartbeat > 0:
            self.thread = threading.Thread(target=self._run, name="sparkgd-heartbeat",
                                           daemon=True)
            self.thread.start()

    def _run(self):
        while not self.done.is_set():
            self.busy.wait()
            if self.done.wait(self.chan.heartbeat) or not self.busy.is_set():
                continue
            try:
                self.chan.send(wire.OP_ALIVE)
            except OSError:
                return
            try:
                self.links.alive()
            except OSError:
                pass          # the pass itself will find out

    def stop(self):
        self.done.set()
        self.busy.set()


def gradient_work(work, layout):
    """The work a task computes when the engine's user gives none of its own: the
    gradient sums, nothing else (the fit's coordinator passes
    :func:`sparkgd.work.parse`)."""
    if work is not None:
        raise ValueError(f"work {work!r}, and no parser for it")
    return _Gradient()


class _Gradient:
    def size(self, layout):
        return 2 + layout.size

    def compute(self, blocks, theta, loss, layout, sample, index, threads=1):
        fraction, seed, iteration = (1.0, 0, 0) if sample is None else sample
        rows = None if fraction >= 1.0 else (fraction, seed, iteration, index)
        return kernels.partition_sums(blocks, theta, loss, layout, sample=rows,
                                      threads=threads)


class _State:
    """What a task keeps between passes."""

    def __init__(self, index, parse_work=gradient_work):
        self.index = index
        self.parse_work = parse_work
        self.worker = None        # what a pass computes (parse_work of the config's work)
        self.sums = 0             # floats in a pass's vector of sums, past the two leading
        self.loss = self.layout = None
        self.codec = self.theta_codec = codecs.NONE
        self.max_frame = wire.FIRST_FRAME    # the hub raises it (OP_LIMIT, sealed)
        self.held = None          # the theta this task holds (differences apply to it)
        self.residual = None      # error feedback: what it has not sent yet
        self.snapshot = None      # (pass, the residual before it): a pass the hub redid
        #                           never counted, so what it took from the residual
        #                           goes back (OP_PEERS says which passes counted)
        self.slow = 1.0           # a test's knob: this task takes this many times longer
        self.seconds = 0.0        # how long the last pass's computation took

    def configure(self, config):
        self.loss = kernels.make_loss(config["loss"], **config["params"])
        self.layout = kernels.Layout(*config["layout"])
        self.codec = codecs.parse(config.get("compression", "none"))
        self.theta_codec = codecs.parse(config.get("theta_compression", "none"))
        try:
            self.worker = self.parse_work(config.get("work"), self.layout)
        except (ValueError, KeyError, TypeError) as e:
            raise wire.ProtocolError(f"a configuration with {e}") from None
        self.sums = self.worker.size(self.layout) - 2
        slow = config.get("slow")
        self.slow = float(slow[1]) if slow and int(slow[0]) == self.index else 1.0
        self.held = None
        self.residual = self.snapshot = None   # error feedback starts afresh

    def begin(self, pass_no):
        if self.residual is not None:
            self.snapshot = (pass_no, self.residual.copy())

    def peers(self, config):
        """A new epoch: a pass after the last one the hub counted was redone."""
        counted = config.get("counted")
        if self.snapshot is not None and counted is not None and \
                self.snapshot[0] > counted:
            self.residual = self.snapshot[1]
        self.snapshot = None

    def residual_for(self, n):
        if self.codec.error_feedback and (self.residual is None or self.residual.size != n):
            self.residual = np.zeros(n)
        return self.residual

    def pack(self, head, grad, seed, lo=None, hi=None):
        """Encode sums (a chunk ``[lo, hi)`` of the gradient's residual when given)."""
        res = self.residual_for(self.sums)
        if res is None:
            return co.pack_sums(head, grad, self.codec, None, seed)[0]
        part = res if lo is None else res[lo:hi]
        data, new = co.pack_sums(head, grad, self.codec, part, seed)
        part[...] = new
        return data


def serve(chan, blocks, index, threads, secret, parse_work=gradient_work, columns=None):
    """Answer the driver until it says stop (or goes away). ``parse_work``: what a
    pass computes for the work of a configuration (:func:`sparkgd.work.parse`);
    ``columns``: the sorted columns the task's (CSR) rows touch, which OP_COLUMNS
    places among the fit's (the blocks are then re-indexed to those)."""
    host = chan.sock.getsockname()[0]
    listener = peers.open_listener(host)
    links = peers.Links(secret, index, listener, chan.heartbeat, hub_sock=chan.sock)
    chan.send(wire.OP_ADDRESS, json.dumps({"address": links.address}).encode())
    state = _State(index, parse_work)
    beat = _Heartbeat(chan, links)

    def compute(theta, frame):
        started = time.perf_counter()
        sums = state.worker.compute(blocks, theta, state.loss, state.layout,
                                    (frame.fraction, frame.seed, frame.iteration), index,
                                    threads)
        took = time.perf_counter() - started
        if state.slow > 1.0:
            time.sleep((state.slow - 1.0) * took)
        state.seconds = time.perf_counter() - started
        return sums

    def run_pass(frame):
        links.sent = 0
        state.begin(frame.pass_no)
        beat.busy.set()
        try:
            PASSES[links.topology](state, chan, links, frame, compute)
        except peers.PeerError as e:
            links.close()
            _failed(chan, links, e, frame.pass_no)
        finally:
            beat.busy.clear()

    def links_up():
        beat.busy.set()           # the hub hears from this task while it waits
        try:
            links.ensure()
        except peers.PeerError as e:
            _failed(chan, links, e)
        finally:
            beat.busy.clear()

    def place(frame):
        positions = np.frombuffer(frame.payload, dtype="<i8")
        width = int(frame.iteration)
        local = np.zeros(0, dtype=np.int64) if columns is None else columns
        if positions.size != local.size or (positions.size and (
                positions[0] < 0 or positions[-1] >= width or
                np.any(np.diff(positions) <= 0))):
            raise wire.ProtocolError(f"{positions.size} column positions for "
                                     f"{local.size} columns")
        blocks[:] = remap_columns(blocks, positions, width)

    try:
        _loop(chan, links, state, run_pass, links_up, place)
    except (ConnectionResetError, BrokenPipeError):
        return                    # the driver ended the session while we spoke
    finally:
        beat.stop()
        links.close(parked=True)
        if listener is not None:
            listener.close()


def _loop(chan, links, state, run_pass, links_up, place=None):
    """The task's frames, until the driver says stop or goes away."""
    while True:
        if links.topology == "tree" and links.up is not None and \
                not _hub_first(chan, links):
            # a tree's pass reaches this task from its parent, not from the hub
            try:
                frame = links.recv(links.up, wire.OP_SUMS, None)
            except peers.PeerError as e:
                links.close()
                _failed(chan, links, e)
                continue
            if state.loss is None:
                raise wire.ProtocolError("a pass before the configuration")
            run_pass(frame)
            continue
        try:
            # a frame's size is read before the frame opens: allocate no more than the
            # largest the hub said it sends (OP_LIMIT) or theta in full
            frame = chan.recv(state.max_frame)
        except (EOFError, ConnectionResetError, BrokenPipeError):
            return            # the driver ended the session (or died, or replaced us)
        if frame.op == wire.OP_STOP:
            return
        if frame.op == wire.OP_LIMIT:
            state.max_frame = min(wire.MAX_PAYLOAD, max(state.max_frame, int(frame.iteration)))
            continue
        if frame.op == wire.OP_COLUMNS and place is not None:
            place(frame)
            continue
        if frame.op == wire.OP_CONFIG:
            state.configure(json.loads(bytes(frame.payload)))
            n = state.layout.size
            links.max_payload = max(co.theta_bytes(codecs.NONE, n, False),
                                    co.sums_bytes(codecs.NONE, max(n, state.sums)))
            state.max_frame = max(state.max_frame, co.theta_bytes(codecs.NONE, n, False))
            continue
        if frame.op == wire.OP_PEERS:
            config = json.loads(bytes(frame.payload))
            state.peers(config)
            links.set_peers(config)
            if links.topology == "tree":
                links_up()            # now: the passes come down these links
            continue
        if frame.op != wire.OP_SUMS or state.loss is None:
            raise wire.ProtocolError(f"op {frame.op} where a request was due")
        run_pass(frame)


def _hub_first(chan, links):
    """Wait until the hub or the parent has something; -> True when the hub does (its
    frames come first: a new epoch or a stop overrides a pass)."""
    ready, _, _ = select.select([chan.sock, links.up.sock], [], [])
    return chan.sock in ready


def _failed(chan, links, error, pass_no=0):
    """Tell the hub a link failed (OP_PEER_FAIL: ``seed`` the epoch, ``iteration`` the
    bytes this task sent to others meanwhile)."""
    chan.send(wire.OP_PEER_FAIL, str(error)[:500].encode(), pass_no=pass_no,
              seed=max(links.epoch, 0), iteration=links.sent)


def _seed(frame, index, *more):
    return (frame.seed, frame.pass_no, index, *more)


def _star(state, chan, links, frame, compute):
    n = state.layout.size
    theta = state.held = co.apply_theta(frame.payload, state.held, state.theta_codec, n)
    sums = compute(theta, frame)
    if state.codec.lossy:
        sums = state.pack(sums[:2], sums[2:], _seed(frame, state.index))
    else:
        sums = co.pack_exact(sums)         # sparse where few values are non-zero
    chan.send(wire.OP_REPLY, sums, pass_no=frame.pass_no, fraction=state.seconds)


def _tree(state, chan, links, frame, compute):
    """``frame``: the pass with theta, from the hub (task 0) or the parent; on to the
    children with the same header; the sums of this task's subtree (own first, then
    each child's in ascending order) up, with the bytes the subtree sent to other tasks
    (``iteration``). Only task 0 talks to the hub."""
    i, n, codec, p = state.index, state.layout.size, state.codec, frame.pass_no
    m = state.sums
    links.ensure()
    parent, children = links.roles()
    msg = frame.payload
    for j in children:
        links.send(links.down[j], wire.OP_SUMS, msg, p, iteration=frame.iteration,
                   seed=frame.seed, fraction=frame.fraction)
    try:
        theta = state.held = co.apply_theta(msg, state.held, state.theta_codec, n)
    except codecs.CodecError as e:
        raise peers.PeerError(f"task {i}: {e}") from None
    total = compute(theta, frame)
    below = 0                     # bytes the children's subtrees sent
    for j in children:
        reply = links.recv(links.down[j], wire.OP_REPLY, p)
        below += reply.iteration
        try:
            total += co.unpack_sums(reply.payload, codec, m)
        except codecs.CodecError as e:
            raise peers.PeerError(f"task {i}: from task {j}: {e}") from None
    # dense or sparse by size, at every hop (a subtree's total densifies going up)
    data = co.pack_exact(total) if not codec.lossy else \
        state.pack(total[:2], total[2:], _seed(frame, i))
    if parent is None:
        chan.send(wire.OP_REPLY, data, pass_no=p, iteration=links.sent + below,
                  fraction=state.seconds)
    else:
        up = links.sent + below + wire.as_bytes(data).nbytes
        links.send(links.up, wire.OP_REPLY, data, p, iteration=up)
        if links.timed:
            # the hub learns each task's time without waiting for it (a header alone)
            chan.send(wire.OP_ALIVE, pass_no=p, fraction=state.seconds)


def _ring(state, chan, links, frame, compute):
    """All-gather theta's chunks, then reduce-scatter the sums: at step ``s`` task ``i``
    sends chunk ``i - s`` to the next task and receives chunk ``i - s - 1``."""
    i, n, codec, p = state.index, state.layout.size, state.codec, frame.pass_no
    links.ensure()
    size = links.num_tasks
    b = co.chunk_bounds(n, size)
    prev = links.down.get((i - 1) % size)
    msgs = {i: frame.payload}
    for s in range(size - 1):
        links.send(links.up, wire.OP_SUMS, msgs[co.ring_send_chunk(i, s, size)], p)
        msgs[(i - s - 1) % size] = links.recv(prev, wire.OP_SUMS, p).payload
    held = state.held if state.held is not None and state.held.size == n else None
    theta = np.empty(n)
    try:
        for c in range(size):
            lo, hi = b[c], b[c + 1]
            theta[lo:hi] = co.apply_theta(msgs[c], None if held is None else held[lo:hi],
                                          state.theta_codec, hi - lo)
    except codecs.CodecError as e:
        raise peers.PeerError(f"task {i}: {e}") from None
    state.held = theta
    sums = compute(theta, frame)
    head, grad = sums[:2], sums[2:]
    b = co.chunk_bounds(state.sums, size)      # the sums' chunks (theta's: above)

    def own(c):
        return (head.copy() if c == 0 else None), grad[b[c]:b[c + 1]].copy()

    acc_head, acc = own(i)
    for s in range(size - 1):
        c = co.ring_send_chunk(i, s, size)
        links.send(links.up, wire.OP_REPLY, _chunk(state, frame, c, acc_head, acc, b), p)
        r = (i - s - 1) % size
        data = links.recv(prev, wire.OP_REPLY, p).payload
        try:
            got = co.unpack_sums(data, codec, b[r + 1] - b[r], with_head=(r == 0))
        except codecs.CodecError as e:
            raise peers.PeerError(f"task {i}: from task {(i - 1) % size}: {e}") from None
        mine_head, mine = own(r)
        if r == 0:
            acc_head, acc = got[:2] + mine_head, got[2:] + mine
        else:
            acc_head, acc = None, got + mine
    links.flush()
    c = co.ring_final_chunk(i, size)
    chan.send(wire.OP_REPLY, _chunk(state, frame, c, acc_head, acc, b), pass_no=p,
              iteration=links.sent, fraction=state.seconds)


def _chunk(state, frame, c, head, grad, b):
    if not state.codec.lossy:
        return grad if head is None else np.concatenate([head, grad])
    return state.pack(head, grad, _seed(frame, state.index, c), b[c], b[c + 1])


PASSES = {"star": _star, "tree": _tree, "ring": _ring}
