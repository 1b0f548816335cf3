"""The driver's end of the serving tasks' sockets: rendezvous, requests, replies.

:class:`Hub` accepts the tasks of one serving job (checking each hello), sends every
task the loss and layout (OP_CONFIG) and theta (OP_SUMS), and reads their sums back in
task order. It knows nothing of Spark: the job that runs the tasks
(:class:`sparkgd.engine.jobs.ServingJob`) tells it whether the job ended and how many
tasks run.
"""
from __future__ import annotations

import logging
import os
import selectors
import socket
import struct
import time

from .wire import (ACCEPT, OP_STOP, OP_SUMS, REJECT, pack_config, pack_request, read_hello,
                   read_reply)

log = logging.getLogger("sparkgd")


class WorkersUnavailable(RuntimeError):
    """The cluster could not run every serving task at once."""


class WorkersFailed(RuntimeError):
    """The serving job ended with an error (its message is the job's)."""


class TaskLost(RuntimeError):
    """A serving task that holds its own blocks went away (or a new attempt of it
    appeared) during the fit: what it contributed can no longer be vouched for."""


def driver_address(sc):
    """-> (address to bind, address tasks connect to)."""
    conf = sc.getConf()
    host = conf.get("spark.driver.host", None) or socket.gethostname()
    bind = conf.get("spark.driver.bindAddress", None) or host
    return bind, host


class Hub:
    """The driver's end of the sockets: accepts tasks, hands out requests, reads
    replies. Knows nothing of Spark: ``ended()`` raises if the tasks' job is over,
    ``running()`` says how many tasks are running (both asked only while waiting).
    """

    def __init__(self, num_tasks, size, bind, ended, running, wait_seconds=30.0,
                 expected=None, strict=False, failed=None):
        self.num_tasks, self.size = int(num_tasks), int(size)
        #: strict: a lost task or a second attempt of one raises TaskLost instead of
        #: being waited for (tasks that built their own blocks: see ServedJob)
        self.strict = strict
        self._failed = failed         # -> number of failed task attempts so far
        self.facts = {}               # task index -> the facts bytes of its hello
        self.floats = {}              # task index -> the float64 array of its hello
        #: per task index, the sorted block keys it must report (None: not checked)
        self.expected = expected
        self.refused = 0
        self.wait_seconds = float(wait_seconds)
        self.secret = os.urandom(16).hex().encode()
        self.reconnects = 0
        self.short = False            # gave up waiting for task slots
        self._ended, self._running = ended, running
        self._listener = socket.create_server((bind, 0), backlog=socket.SOMAXCONN)
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._conns = {}
        self._seen = set()            # task indices that have ever been accepted
        self._config = None           # the OP_CONFIG frame every (new) task gets first

    def wait_for_tasks(self):
        self._wait(lambda: len(self._conns) < self.num_tasks, None, set())
        if self.strict:
            # a task Spark failed (its input broke upstream) may still have connected,
            # its Python side unaware: if the driver already knows, stop here
            self._ended()
            if self._failed is not None and self._failed() > 0:
                raise WorkersFailed("a task failed while the blocks were built")

    def evaluate(self, theta, sample=None):
        """Every task's sums for ``theta``, in task order."""
        request = pack_request(OP_SUMS, theta, sample)
        pending = set(range(self.num_tasks))
        for i in sorted(self._conns):
            self._send(i, request)
        replies = {}
        self._wait(lambda: bool(pending), request, pending, replies)
        return [replies[i] for i in range(self.num_tasks)]

    def _send(self, i, request):
        try:
            self._conns[i].sendall(request)
        except OSError:
            self._drop(i)
            self._lost(i)

    def _lost(self, i, attempt=None):
        if self.strict and self._listener is not None:
            again = "" if attempt is None else f" (a new attempt, {attempt}, connected)"
            raise TaskLost(f"serving task {i} was lost{again}")

    def configure(self, config):
        """Send every task the loss and layout to compute with (OP_CONFIG); a task that
        connects later gets it first."""
        self._config = request = pack_config(config)
        for i in sorted(self._conns):
            self._send(i, request)

    def _drop(self, i):
        conn = self._conns.pop(i, None)
        if conn is not None:
            self._sel.unregister(conn)
            conn.close()

    def _wait(self, waiting, request, pending, replies=None):
        """Serve the selector until ``waiting()`` is false: accept (re)connecting
        tasks, hand them the request in progress, read replies."""
        short_since = None
        while waiting():
            for key, _ in self._sel.select(timeout=0.25):
                if key.data is None:
                    self._accept(request, pending)
                    continue
                i = key.data
                try:
                    reply = read_reply(key.fileobj, self.size)
                except (OSError, EOFError, ValueError):
                    self._drop(i)   # its task is gone; a new attempt will connect
                    self._lost(i)
                    continue
                if replies is not None and i in pending:
                    replies[i] = reply
                    pending.discard(i)
            if not waiting():
                break
            self._ended()
            if len(self._conns) < self.num_tasks:
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
                elif time.monotonic() - short_since > self.wait_seconds:
                    self.short = True
                    raise WorkersUnavailable(
                        f"only {running} of {self.num_tasks} serving tasks could run at "
                        f"once for {self.wait_seconds:g}s")

    def _accept(self, request, pending):
        try:
            conn, _ = self._listener.accept()
        except BlockingIOError:
            return
        try:
            conn.setblocking(True)
            conn.settimeout(30)
            index, attempt, keys, facts, floats = read_hello(conn, self.secret)
            if not 0 <= index < self.num_tasks:
                raise ValueError(f"task index {index} out of range")
            if self.strict and index in self._seen:
                conn.sendall(REJECT)
                conn.close()
                self._lost(index, attempt)
            if self.expected is not None and keys != self.expected[index]:
                self.refused += 1
                log.info("serving task %d (attempt %d) refused: %d of %d blocks as expected",
                         index, attempt, len(set(keys) & set(self.expected[index])),
                         len(self.expected[index]))
                conn.sendall(REJECT)
                raise ValueError("incomplete input")
            conn.sendall(ACCEPT)
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, EOFError, ValueError, struct.error):
            conn.close()
            return
        if index in self._conns:    # a newer attempt of a task we still had
            self._drop(index)
        if index in self._seen:
            self.reconnects += 1
            log.info("serving task %d reconnected (attempt %d)", index, attempt)
        self._seen.add(index)
        self.facts[index] = facts
        self.floats[index] = floats
        self._conns[index] = conn
        self._sel.register(conn, selectors.EVENT_READ, index)
        if self._config is not None:
            self._send(index, self._config)
        if request is not None and index in pending:
            self._send(index, request)

    def close(self):
        """Tell every connected task to stop; close the sockets."""
        stop = pack_request(OP_STOP)
        listener, self._listener = self._listener, None   # no TaskLost while stopping
        if listener is None:
            return
        for i in list(self._conns):
            self._send(i, stop)
            self._drop(i)
        self._sel.close()
        listener.close()
