"""A serving task's links to other tasks (the ``tree`` and ``ring`` topologies).

Every serving task listens on the address it reaches the hub from and tells the hub
(OP_ADDRESS). For each *epoch* -- the tasks that were connected when the hub last
handed out addresses (OP_PEERS) -- a task opens its links at the first pass: it
connects to one task (tree: its parent; ring: the next task) and accepts from the
others (tree: its children; ring: the previous task)::

    connector -> acceptor   magic, nonce_c, X25519 share_c                      clear
                            + sealed (the fit's key): index, epoch
    acceptor  -> connector  nonce_a, X25519 share_a                             clear
                            + sealed (the link's key): "ok"
    connector -> acceptor   a sealed frame (the link's key): the link is taken

then sealed frames exactly as to the hub (:class:`~sparkgd.engine.wire.Channel`), under
keys of their own from the fit's key, both shares' secret and both nonces. The
connector speaks first, so a ring of tasks that all connect before they accept cannot
deadlock. A hello for another epoch, from an unexpected task, that does not open, or
that never confirms (a recorded hello played again cannot: it lacks the share's
private half) takes no link, and many hellos are handled at once, each within
:data:`HELLO_SECONDS`: strangers on a task's port cannot keep it from its links. A
link that fails mid-pass -- closed, reset, silent for four heartbeat intervals, a
frame that does not open -- raises :class:`PeerError`: the task closes all its links,
so the tasks waiting on it stop waiting too, and tells the hub, which hands out a new
epoch and redoes the pass (:mod:`.hub`).

While a pass computes, the task's heartbeat also goes up its one outgoing link (to
the parent, or the next task), so the task waiting on it can tell a slow pass from a
dead link.
"""
from __future__ import annotations

import os
import queue
import select
import socket
import struct
import threading
import time

from . import collective, wire
from .seal import TAG, Sealer, Share, Unsealed, derive

PEER_MAGIC = b"SGDP"
#: Seconds a connection to a task's listener has to deliver its hello and confirm it
#: (a task sends both as soon as it can).
HELLO_SECONDS = 5.0
#: Hellos in progress at once on a task's listener; beyond, the oldest is dropped.
MAX_PENDING = 64
_CLEAR = struct.Struct("<4s16s32s")       # magic, nonce_c, share_c
_WHO = struct.Struct("<iQ")               # index, epoch (sealed)
_REPLY = struct.Struct("<16s32s")         # nonce_a, share_a
_OK = b"sparkgd-peer-ok"
HELLO_BYTES = _CLEAR.size + _WHO.size + TAG
REPLY_BYTES = _REPLY.size + len(_OK) + TAG


class PeerError(RuntimeError):
    """A link to another task failed (or was never made) during a pass."""


def _hello_key(secret, nonce_c):
    return derive(secret, nonce_c, b"peer hello")


def _link_conn(secret, shared, nonce_c, nonce_a, connector):
    material, salt = bytes(secret) + bytes(shared), bytes(nonce_c) + bytes(nonce_a)
    to_acceptor = derive(material, salt, b"peer to acceptor")
    to_connector = derive(material, salt, b"peer to connector")
    return wire.Conn(to_acceptor, to_connector) if connector else \
        wire.Conn(to_connector, to_acceptor)


def _ok_key(secret, shared, nonce_c, nonce_a):
    return derive(bytes(secret) + bytes(shared), bytes(nonce_c) + bytes(nonce_a),
                  b"peer ok")


def open_listener(host):
    """A non-blocking listener on ``host`` (the address this task reaches the hub
    from), any free port; None when that cannot be done (the hub then keeps to star)."""
    try:
        return wire.listen(host)
    except OSError:
        return None


class _Hello:
    """A connection on a task's listener, until it is a link or dropped: its hello
    (read without blocking), the reply, its confirming frame."""

    def __init__(self, sock, now):
        self.sock = sock
        self.deadline = now + HELLO_SECONDS
        self.inbound = wire.Inbound(HELLO_BYTES)
        self.stage = "hello"
        self.index = self.epoch = None
        self.nonce_c = self.share_c = None
        self.conn = None
        self.prefix = None

    def read_hello(self, secret):
        """The hello arrived: -> (index, epoch); ProtocolError when it does not open."""
        data = bytes(self.inbound.buf)
        clear, sealed = data[:_CLEAR.size], data[_CLEAR.size:]
        magic, self.nonce_c, self.share_c = _CLEAR.unpack(clear)
        if magic != PEER_MAGIC:
            raise wire.ProtocolError("not a task of this fit")
        try:
            who = Sealer(_hello_key(secret, self.nonce_c)).open(clear, sealed)
        except Unsealed:
            raise wire.ProtocolError("not a task of this fit") from None
        self.index, self.epoch = _WHO.unpack(who)
        return self.index, self.epoch

    def reply(self, secret):
        """Answer with this end's share; -> the link's frames (once confirmed)."""
        mine, nonce_a = Share(), os.urandom(wire.NONCE)
        try:
            shared = mine.shared(self.share_c)
        except Unsealed as e:
            raise wire.ProtocolError(str(e)) from None
        clear = _REPLY.pack(nonce_a, mine.public)
        ok = Sealer(_ok_key(secret, shared, self.nonce_c, nonce_a)).seal(clear, _OK)
        self.sock.setblocking(True)
        self.sock.settimeout(max(0.001, self.deadline - time.monotonic()))
        self.sock.sendall(clear + ok)
        self.sock.setblocking(False)
        self.conn = _link_conn(secret, shared, self.nonce_c, nonce_a, connector=False)
        self.stage = "prefix"
        self.inbound.expect(wire.PREFIX_BYTES)

    def confirmed(self):
        """The connector's first frame arrived and opens: the link is taken."""
        if self.stage == "prefix":
            self.prefix = bytes(self.inbound.buf)
            _, _, rest = wire.parse_prefix(self.prefix, 0)
            self.stage = "confirm"
            self.inbound.expect(rest)
            return False
        frame = self.conn.open(self.prefix, self.inbound.buf)
        if frame.op != wire.OP_ALIVE:
            raise wire.ProtocolError(f"op {frame.op} where a link's confirmation was due")
        return True


class _Sender(threading.Thread):
    """Sends on a task's outgoing link in order, off the main thread: in a ring every
    task sends to the next before it reads from the previous, which would deadlock once
    a message outgrows the sockets' buffers; in a tree a parent reads its children only
    after its own pass. The link is patient (a slow reader is not a dead one: a dead
    link shows on the reading side, or when the hub hands out a new epoch)."""

    def __init__(self, chan):
        super().__init__(name="sparkgd-peer-send", daemon=True)
        self.chan = chan
        self.todo = queue.Queue()
        self.error = None
        self.start()

    def run(self):
        while True:
            item = self.todo.get()
            if item is None:
                return
            try:
                if self.error is None:
                    self.chan.send(*item[0], **item[1])
            except OSError as e:
                self.error = e
            finally:
                self.todo.task_done()

    def send(self, *args, **fields):
        if self.error is not None:
            raise PeerError(f"sending to the next task failed: {self.error}")
        self.todo.put((args, fields))

    def flush(self):
        self.todo.join()
        if self.error is not None:
            raise PeerError(f"sending to the next task failed: {self.error}")

    def stop(self):
        self.todo.put(None)


class Links:
    """One task's links for the current epoch. ``set_peers`` (from OP_PEERS) forgets
    the old ones; :meth:`ensure` opens the new ones at the next pass."""

    def __init__(self, secret, index, listener, heartbeat, hub_sock=None):
        self.secret, self.index, self.listener = secret, int(index), listener
        self.hub_sock = hub_sock  # while waiting on a link: the hub speaking ends it
        self.timeout = 4 * heartbeat if heartbeat > 0 else 60.0
        self.topology, self.epoch, self.num_tasks = "star", -1, 1
        self.fan_in, self.addresses = 2, []
        self.timed = False        # tree: tell the hub this task's time after each pass
        self.up = None            # tree: the parent; ring: the next task
        self.down = {}            # tree: the children; ring: the previous task
        self.sender = None        # ring: sends to the next task
        self.sent = 0             # payload bytes sent to other tasks (this pass)
        self.rejected = 0         # strangers and stale hellos dropped
        self.hellos = []          # connections on the listener, hellos in progress
        self.parked = []          # hellos (opened) for a later epoch
        self.max_payload = wire.MAX_PAYLOAD
        self.last_pass = 0        # the last pass that came down from a parent

    @property
    def address(self):
        if self.listener is None:
            return None
        host, port = self.listener.getsockname()[:2]
        return [host, port]

    def set_peers(self, config):
        self.close()
        self.topology = config["topology"]
        if self.topology == "star":
            self.close(parked=True)
        self.epoch = int(config.get("epoch", -1))
        self.num_tasks = int(config.get("num_tasks", 1))
        self.fan_in = int(config.get("fan_in", 2))
        self.timed = bool(config.get("timed", False))
        self.addresses = [tuple(a) for a in config.get("addresses", [])]

    def roles(self):
        """-> (the task this one connects to or None, the tasks it accepts from)."""
        i, p = self.index, self.num_tasks
        if self.topology == "tree":
            return (collective.tree_parent(i, self.fan_in),
                    collective.tree_children(i, p, self.fan_in))
        if self.topology == "ring" and p > 1:
            return (i + 1) % p, [(i - 1) % p]
        return None, []

    # ------------------------------------------------------------------ opening

    def ensure(self):
        """Open this epoch's links if they are not open yet (PeerError if not)."""
        target, sources = self.roles()
        if (target is None or self.up is not None) and len(self.down) == len(sources) \
                and all(c is not None for c in self.down.values()):
            return
        self.close()
        deadline = time.monotonic() + self.timeout
        pending = None
        try:
            if target is not None:
                pending = self._connect(target, deadline)
            for j in sources:
                self.down[j] = None
            parked, self.parked = self.parked, []
            for hello in parked:          # they came before this task got here
                if hello.epoch == self.epoch and self.down.get(hello.index, 0) is None:
                    self._answer(hello)
                elif hello.epoch > self.epoch:
                    self.parked.append(hello)
                else:
                    hello.sock.close()
            # the outgoing link's reply is taken as it comes, among the hellos: in a
            # ring every task waits on its predecessor's confirmation
            while pending is not None or any(c is None for c in self.down.values()):
                if self._serve_listener(deadline, pending):
                    self.up = self._finish(*pending, deadline)
                    pending = None
                    self.sender = _Sender(self.up)
        except PeerError:
            self.close()
            raise
        except (OSError, EOFError, wire.ProtocolError) as e:
            self.close()
            raise PeerError(f"task {self.index}: cannot link to the other tasks "
                            f"(epoch {self.epoch}): {e}") from None
        finally:
            if pending is not None:
                pending[0].close()

    def _connect(self, j, deadline):
        host, port = self.addresses[j]
        sock = socket.create_connection((host, port),
                                        timeout=max(0.001, deadline - time.monotonic()))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        mine, nonce_c = Share(), os.urandom(wire.NONCE)
        clear = _CLEAR.pack(PEER_MAGIC, nonce_c, mine.public)
        sealed = Sealer(_hello_key(self.secret, nonce_c)).seal(
            clear, _WHO.pack(self.index, self.epoch))
        sock.sendall(clear + sealed)
        return sock, mine, nonce_c

    def _wait(self, sock, deadline=None):
        """Until ``sock`` is readable; PeerError as soon as the hub says anything but
        a pass (a new epoch, a stop, or it closed: it has moved on, and what this task
        waits for may never come), socket.timeout at ``deadline``."""
        watch = [sock] if self.hub_sock is None else [sock, self.hub_sock]
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise socket.timeout(f"no word from another task in {self.timeout:g}s")
            ready, _, _ = select.select(watch, [], [], left)
            if sock in ready:
                return
            if self.hub_sock in ready:
                if self._hub_moved_on():
                    raise PeerError(f"task {self.index}: the driver moved on (epoch "
                                    f"{self.epoch})")
                watch = [sock]        # a pass waits its turn (this epoch's links first)

    def _hub_moved_on(self):
        try:
            head = self.hub_sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True
        return not head or head[0] not in (wire.OP_SUMS, wire.OP_LIMIT)

    def _finish(self, sock, mine, nonce_c, deadline):
        """The acceptor's reply -> the link (its first frame confirms it)."""
        self._wait(sock, deadline)
        reply = bytes(wire.recv_exact(sock, REPLY_BYTES, deadline))
        nonce_a, share_a = _REPLY.unpack(reply[:_REPLY.size])
        try:
            shared = mine.shared(share_a)
            ok = Sealer(_ok_key(self.secret, shared, nonce_c, nonce_a)).open(
                reply[:_REPLY.size], reply[_REPLY.size:])
        except Unsealed:
            raise wire.ProtocolError("a peer reply that does not open") from None
        if ok != _OK:
            raise wire.ProtocolError("a peer reply that does not say ok")
        sock.settimeout(self.timeout)
        chan = wire.Channel(sock, _link_conn(self.secret, shared, nonce_c, nonce_a,
                                             connector=True), patient=True)
        chan.send(wire.OP_ALIVE)          # the confirmation: the link is taken
        return chan

    def _serve_listener(self, deadline, pending=None):
        """One round over the listener and the hellos in progress: accept what is
        there, read what arrived, drop what is late or wrong; a confirmed hello for this
        epoch becomes a link. -> True when ``pending`` (the outgoing link's socket,
        first) has its reply waiting."""
        now = time.monotonic()
        if now >= deadline:
            missing = [j for j, c in self.down.items() if c is None]
            raise socket.timeout(f"tasks {missing} did not connect within "
                                 f"{self.timeout:g}s" if missing else
                                 f"no word from task {self.roles()[0]} in "
                                 f"{self.timeout:g}s")
        for hello in [h for h in self.hellos if now > h.deadline]:
            self._drop(hello)
        watch = ([] if self.listener is None else [self.listener]) + \
            [h.sock for h in self.hellos]
        if pending is not None:
            watch.append(pending[0])
        if self.hub_sock is not None:
            watch.append(self.hub_sock)
        wake = min([deadline] + [h.deadline for h in self.hellos])
        ready, _, _ = select.select(watch, [], [], max(0.0, wake - now))
        if self.hub_sock in ready and self._hub_moved_on():
            raise PeerError(f"task {self.index}: the driver moved on (epoch {self.epoch})")
        if self.listener is not None and self.listener in ready:
            self._take_connections()
        for hello in [h for h in self.hellos if h.sock in ready]:
            self._read(hello)
        return pending is not None and pending[0] in ready

    def _take_connections(self):
        for _ in range(MAX_PENDING):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:   # out of descriptors: shed the oldest hello in progress
                if self.hellos:
                    self._drop(self.hellos[0])
                return
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            while len(self.hellos) >= MAX_PENDING:
                self._drop(self.hellos[0])
            self.hellos.append(_Hello(sock, time.monotonic()))

    def _read(self, hello):
        try:
            while hello.inbound.fill(hello.sock):
                if hello.stage == "hello":
                    j, epoch = hello.read_hello(self.secret)
                    if epoch > self.epoch:
                        # the hub has moved on (this pass is being redone): keep the hello
                        # for then, and stop waiting for this epoch's links
                        self.hellos.remove(hello)
                        self.parked.append(hello)
                        raise PeerError(f"task {self.index}: task {j} links for epoch "
                                        f"{epoch}; this is epoch {self.epoch}")
                    if epoch != self.epoch or self.down.get(j, 0) is not None:
                        raise wire.ProtocolError("not a task of this epoch")
                    hello.reply(self.secret)
                elif hello.confirmed():
                    self.hellos.remove(hello)
                    self._take(hello)
                    return
        except PeerError:
            raise
        except (OSError, EOFError, wire.ProtocolError):
            self._drop(hello)

    def _answer(self, hello):
        """A parked hello of this epoch: answer it now; its confirmation comes next."""
        try:
            hello.deadline = time.monotonic() + HELLO_SECONDS
            hello.reply(self.secret)
            self.hellos.append(hello)
        except (OSError, wire.ProtocolError):
            self.rejected += 1
            hello.sock.close()

    def _drop(self, hello):
        self.rejected += 1
        if hello in self.hellos:
            self.hellos.remove(hello)
        hello.sock.close()

    def _take(self, hello):
        """Task ``hello.index``'s confirmed link: open."""
        hello.sock.setblocking(True)
        hello.sock.settimeout(self.timeout)
        self.down[hello.index] = wire.Channel(hello.sock, hello.conn)

    # ------------------------------------------------------------------ messages

    def send(self, chan, op, payload, pass_no, **fields):
        """Send on a link: the outgoing one through its sender thread (in order)."""
        try:
            if self.sender is not None and chan is self.up:
                self.sender.send(op, payload, pass_no=pass_no, **fields)
            else:
                chan.send(op, payload, pass_no=pass_no, **fields)
        except OSError as e:
            raise PeerError(f"task {self.index}: sending to another task failed: {e}") \
                from None
        self.sent += wire.as_bytes(payload).nbytes

    def recv(self, chan, op, pass_no):
        """The next frame of ``op`` for ``pass_no`` on ``chan`` (heartbeats skipped;
        ``pass_no`` None: a pass after the last one received)."""
        try:
            while True:
                self._wait(chan.sock, time.monotonic() + self.timeout)
                frame = chan.recv(self.max_payload)
                if frame.op == wire.OP_ALIVE:
                    continue
                if pass_no is None and frame.op == op and frame.pass_no > self.last_pass:
                    self.last_pass = frame.pass_no
                    return frame
                if frame.op != op or frame.pass_no != pass_no:
                    raise wire.ProtocolError(f"op {frame.op} of pass {frame.pass_no} where "
                                             f"op {op} of pass {pass_no} was due")
                return frame
        except (OSError, EOFError, wire.ProtocolError) as e:
            raise PeerError(f"task {self.index}: a link to another task failed: "
                            f"{e or type(e).__name__}") from None

    def flush(self):
        if self.sender is not None:
            self.sender.flush()

    def alive(self):
        """A heartbeat up the outgoing link (from the heartbeat thread)."""
        up = self.up
        if up is not None:
            up.try_send(wire.OP_ALIVE)

    def close(self, parked=False):
        """Close this epoch's links (``parked``: the hellos kept for later ones too)."""
        if parked:
            for hello in self.parked + self.hellos:
                hello.sock.close()
            self.parked, self.hellos = [], []
        if self.sender is not None:
            self.sender.stop()
            self.sender = None
        for chan in [self.up, *self.down.values()]:
            if chan is not None:
                try:
                    chan.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                chan.close()
        self.up, self.down = None, {}
