"""A serving task's links to other tasks (the ``tree`` and ``ring`` topologies).

Every serving task listens on the address it reaches the driver from and tells the
hub (OP_ADDRESS). For each *epoch* -- the tasks that were connected when the hub last
handed out addresses (OP_PEERS) -- a task opens its links at the first pass: it
connects to one task (tree: its parent; ring: the next task) and accepts from the
others (tree: its children; ring: the previous task)::

    connector -> acceptor   magic, index, epoch, nonce_c + tag(secret; that header)
    acceptor  -> connector  nonce_a + tag(secret; header, nonce_a)

then frames exactly as to the hub (:class:`~sparkgd.engine.wire.Channel`), under
the key ``tag(secret; header, nonce_a)`` and directions of their own. The connector
speaks first, so a ring of tasks that all connect before they accept cannot
deadlock; a hello for another epoch, from an unexpected task or with a wrong tag is
dropped (and counted). A link that fails mid-pass -- closed, reset, silent for four
heartbeat intervals, a frame that does not check out -- raises :class:`PeerError`:
the task closes all its links, so the tasks waiting on it stop waiting too, and tells
the hub, which hands out a new epoch and redoes the pass (:mod:`.hub`).

While a pass computes, the task's heartbeat also goes up its one outgoing link (to
the parent, or the next task), so the task waiting on it can tell a slow pass from a
dead link.
"""
from __future__ import annotations

import hmac
import os
import queue
import select
import socket
import struct
import threading
import time

from . import collective, wire

PEER_MAGIC = b"SGDP"
#: Seconds a connection to a task's listener has to deliver its hello (a task sends it
#: as soon as it connects).
HELLO_SECONDS = 5.0
_PEER_HELLO = struct.Struct("<4siQ16s")       # magic, index, epoch, nonce
CONNECTOR, ACCEPTOR = b"C", b"A"              # the directions a peer frame's MAC covers


class PeerError(RuntimeError):
    """A link to another task failed (or was never made) during a pass."""


def _hello_tag(secret, head):
    return wire.tag(secret, b"sparkgd-peer-hello", head)


def _reply_tag(secret, head, nonce):
    return wire.tag(secret, b"sparkgd-peer-reply", head, nonce)


def _link_key(secret, head, nonce):
    return wire.tag(secret, b"sparkgd-peer-key", head, nonce)


def _recv_by(sock, n, deadline):
    """Exactly ``n`` bytes by ``deadline`` (however slowly they trickle in), else
    socket.timeout; EOFError if the peer closes first."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout(f"{got} of {n} bytes of a hello in time")
        sock.settimeout(left)
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError(f"connection closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


def open_listener(host):
    """A blocking listener on ``host`` (the address this task reaches the driver
    from), any free port; None when that cannot be done (the hub then keeps to star)."""
    try:
        s = wire.listen(host)
        s.setblocking(True)
        return s
    except OSError:
        return None


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
        self.parked = []          # hellos for a later epoch: (epoch, index, socket, header)
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
                pending = self._connect(target)
            for j in sources:
                self.down[j] = None
            parked, self.parked = self.parked, []
            for epoch, j, sock, head in parked:   # they came before this task got here
                if epoch == self.epoch and self.down.get(j, 0) is None:
                    self._take(j, sock, head)
                elif epoch > self.epoch:
                    self.parked.append((epoch, j, sock, head))
                else:
                    sock.close()
            while any(c is None for c in self.down.values()):
                self._accept(deadline)
            if pending is not None:
                self.up = self._finish(*pending)
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

    def _connect(self, j):
        host, port = self.addresses[j]
        sock = socket.create_connection((host, port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = _PEER_HELLO.pack(PEER_MAGIC, self.index, self.epoch, os.urandom(wire.NONCE))
        sock.sendall(head + _hello_tag(self.secret, head))
        return sock, head

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
        return not head or head[0] != wire.OP_SUMS

    def _finish(self, sock, head):
        self._wait(sock, time.monotonic() + self.timeout)
        reply = wire.recv_exact(sock, wire.NONCE + wire.TAG)
        nonce, got = bytes(reply[:wire.NONCE]), bytes(reply[wire.NONCE:])
        if not hmac.compare_digest(got, _reply_tag(self.secret, head, nonce)):
            raise wire.ProtocolError("a peer reply with a wrong tag")
        return wire.Channel(sock, _link_key(self.secret, head, nonce), CONNECTOR, ACCEPTOR,
                            patient=True)

    def _accept(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            missing = [j for j, c in self.down.items() if c is None]
            raise socket.timeout(f"tasks {missing} did not connect within "
                                 f"{self.timeout:g}s")
        self._wait(self.listener, deadline)
        self.listener.settimeout(left)
        sock, _ = self.listener.accept()
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            data = _recv_by(sock, _PEER_HELLO.size + wire.TAG,
                            time.monotonic() + min(left, HELLO_SECONDS))
            head, got = data[:_PEER_HELLO.size], data[_PEER_HELLO.size:]
            magic, j, epoch, _ = _PEER_HELLO.unpack(head)
            if magic != PEER_MAGIC or not hmac.compare_digest(got, _hello_tag(self.secret,
                                                                            head)):
                raise wire.ProtocolError("not a task of this fit")
            if epoch > self.epoch:
                # the hub has moved on (this pass is being redone): keep the hello for
                # then, and stop waiting for this epoch's links
                self.parked.append((epoch, j, sock, head))
                raise PeerError(f"task {self.index}: task {j} links for epoch {epoch}; "
                                f"this is epoch {self.epoch}")
            if epoch != self.epoch or self.down.get(j, 0) is not None:
                raise wire.ProtocolError("not a task of this epoch")
            self._take(j, sock, head)
        except (OSError, EOFError, wire.ProtocolError):
            self.rejected += 1
            sock.close()

    def _take(self, j, sock, head):
        """Answer task ``j``'s checked hello: the link is open."""
        nonce = os.urandom(wire.NONCE)
        sock.sendall(nonce + _reply_tag(self.secret, head, nonce))
        sock.settimeout(self.timeout)
        self.down[j] = wire.Channel(sock, _link_key(self.secret, head, nonce), ACCEPTOR,
                                    CONNECTOR)

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
            for _, _, sock, _ in self.parked:
                sock.close()
            self.parked = []
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
