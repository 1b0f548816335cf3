"""Driver checkpoints: a fit that lost its driver goes on from its last checkpoint.

``checkpointDir`` + ``checkpointInterval`` (every that many iterations; Spark ML's
param, -1 switches it off). A checkpoint is a directory a person can read and that
needs no pickle to load::

    checkpoint.json      iteration, mode, objective history, the data's fingerprint,
                         the params that decide the fit, what the files below hold
    evals-00001.npy/json sync: the evaluations since the previous checkpoint (the
                         gradients; F values and point hashes)
    state.npz            local, async: the model (and the server's), float64 arrays
    space.npz            the optimizer's space: its start and the feature moments it
                         scaled by (a resumed fit uses these, to the bit)

Every file is written beside its name and renamed into place, ``checkpoint.json``
last, so a driver killed while writing leaves the previous checkpoint whole.

**Exact for every optimizer.** In ``mode=sync`` the optimizer's state -- L-BFGS's
correction pairs inside SciPy, gd's step and its non-monotone memory, momentum, Adam's
moments -- is a function of the objective values and gradients it was given. So a
checkpoint keeps those (each evaluation's F, gradient and a SHA-256 of the point it was
asked at), and a resumed fit runs the same optimizer from the same start, answering
its first requests from the log without a pass: it arrives at iteration K in exactly
the state the lost driver had, bit for bit, and only then computes passes. A request
at another point than the log's (another SciPy, say) is refused rather than answered
wrongly. The price is disk: 8 (d + 1) bytes an evaluation. ``mode=local`` keeps the
model after round K (the tasks keep nothing between rounds), ``mode=async`` the
server's model at clock K with the pushes of later clocks undone.

What is not kept: compression residuals live in the serving tasks, and a resumed fit
starts them afresh (a lossy codec's fit is not bit-identical across a resume).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re

import numpy as np

from . import npyio
from .errors import SparkgdError

FORMAT = 1
META = "checkpoint.json"
#: Params that do not decide the fit's path (a resumed fit may change them).
FREE_PARAMS = ("checkpointDir", "checkpointInterval", "resume", "maxIter", "tol",
               "predictionCol", "probabilityCol", "rawPredictionCol", "threshold",
               "thresholds")


def fingerprint(facts):
    """What identifies the data: rows, features, total weight, label range and
    histogram, non-zeros -- from the blocks' facts, whatever the partitioning."""
    infos = facts.infos
    hist = facts.label_weights()
    return {"rows": int(facts.num_rows), "features": int(facts.num_features),
            "weight": float(sum(i["wsum"] for i in infos)),
            "labels": [float(min(i["ymin"] for i in infos)),
                       float(max(i["ymax"] for i in infos))] if infos else None,
            "nnz": int(sum(i["nnz"] for i in infos)),
            "histogram": None if hist is None else [float(v) for v in hist]}


def same_data(a, b, rtol=1e-12):
    """Fingerprints of the same data: counts equal, sums equal up to the rounding that
    another grouping of the rows into tasks gives."""
    if a is None or b is None or set(a) != set(b):
        return a == b

    def close(x, y):
        if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
            return len(x) == len(y) and all(close(u, v) for u, v in zip(x, y))
        if isinstance(x, float) or isinstance(y, float):
            return x is not None and y is not None and \
                abs(x - y) <= rtol * max(abs(x), abs(y), 1.0)
        return x == y

    return all(close(a[k], b[k]) for k in a)


def decisive(params):
    """The params a checkpoint must agree on (JSON values)."""
    return {k: v for k, v in sorted(params.items()) if k not in FREE_PARAMS}


def point_hash(x):
    return hashlib.sha256(np.ascontiguousarray(x, dtype="<f8").tobytes()).hexdigest()


def _write(path, write, mode="wb"):
    """``write(file)`` into ``path`` beside it, then renamed into place (fsynced first:
    a rename must not land before the bytes)."""
    tmp = path + ".tmp"
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Checkpointer:
    """Writes (and reads back) one fit's checkpoints in ``directory``."""

    def __init__(self, directory, interval, params, facts, mode, size=None, d=None):
        self.dir = directory
        self.size, self.d = size, d   # theta's values and the features: what files hold
        self.interval = int(interval)
        self.params = decisive(params)
        self.fingerprint = fingerprint(facts)
        self.mode = mode
        self.segments = []          # sync: the evaluation files so far
        self.iteration = 0          # of the last checkpoint written or read
        self.space_arrays = None    # the optimizer's space: start, feature moments
        self._space_written = False

    # ------------------------------------------------------------ reading

    def load(self):
        """-> the checkpoint's meta (dict) or None when there is none; SparkgdError
        when it belongs to other data or other params."""
        path = os.path.join(self.dir, META)
        if not os.path.isfile(path):
            return None
        try:
            with open(path) as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise SparkgdError(f"checkpoint {path} cannot be read: {e}") from None
        if meta.get("format") != FORMAT:
            raise SparkgdError(f"checkpoint {path} has format {meta.get('format')}, "
                               f"not {FORMAT}")
        if not same_data(meta.get("fingerprint"), self.fingerprint):
            raise SparkgdError(
                f"checkpoint in {self.dir} was written for other data ({_describe(meta.get('fingerprint'))}; "
                f"this data: {_describe(self.fingerprint)}): refusing to resume from it")
        theirs = meta.get("params", {})
        if theirs != self.params or meta.get("mode") != self.mode:
            diff = sorted(k for k in set(theirs) | set(self.params)
                          if theirs.get(k) != self.params.get(k))
            what = ", ".join(f"{k} {theirs.get(k)!r} there, {self.params.get(k)!r} here"
                             for k in diff[:4]) or f"mode {meta.get('mode')}"
            raise SparkgdError(f"checkpoint in {self.dir} was written with other params "
                               f"({what}): refusing to resume from it")
        self.segments, self.iteration = _checked(meta, self.dir)
        return meta

    def evaluations(self):
        """sync: the logged evaluations, in order: (hashes, batch flags, F values,
        gradients) concatenated over the segments."""
        hashes, batch, fs, grads = [], [], [], []
        for name in self.segments:
            try:
                with open(os.path.join(self.dir, name + ".json")) as f:
                    seg = json.load(f)
                n = len(seg["hashes"])
                if not (isinstance(seg["hashes"], list) and len(seg["batch"]) == n and
                        len(seg["f"]) == n and all(isinstance(h, str) for h in seg["hashes"])
                        and all(isinstance(v, (int, float)) for v in seg["f"])):
                    raise ValueError("its log's lists do not match")
                with open(os.path.join(self.dir, name + ".npy"), "rb") as f:
                    g = npyio.read(f, (n, self.size), what=f"segment {name}")
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise SparkgdError(f"checkpoint segment {name} in {self.dir} cannot be "
                                   f"used: {e}") from None
            hashes += seg["hashes"]
            batch += [bool(b) for b in seg["batch"]]
            fs += [float(v) for v in seg["f"]]
            grads.append(g)
        return hashes, batch, fs, grads

    def space(self):
        """The optimizer's space the checkpointed fit started with (``x0``, and ``mean``,
        ``std`` where it used the moments), or None."""
        path = os.path.join(self.dir, "space.npz")
        if not os.path.isfile(path):
            return None
        space = self._npz(path, {"x0": (self.size,), "mean": (self.d,), "std": (self.d,)})
        if "x0" not in space or ("mean" in space) != ("std" in space):
            raise SparkgdError(f"checkpoint {path} cannot be used: members "
                               f"{sorted(space)}")
        return space

    def state(self):
        """local, async: the saved vectors, by name."""
        path = os.path.join(self.dir, "state.npz")
        state = self._npz(path, {"theta": (self.size,), "u": (self.size,)})
        if not state:
            raise SparkgdError(f"checkpoint {path} cannot be used: no model in it")
        return state

    def _npz(self, path, shapes):
        try:
            return npyio.read_npz(path, shapes, what=os.path.basename(path))
        except (OSError, ValueError) as e:
            raise SparkgdError(f"checkpoint {path} cannot be used: {e}") from None

    # ------------------------------------------------------------ writing

    def save(self, iteration, history, times, evaluations=None, state=None, extra=None):
        """Checkpoint at ``iteration``. ``evaluations``: sync's new log entries
        ``(hashes, batch flags, F values, gradients as rows)``; ``state``: local's and
        async's vectors by name."""
        os.makedirs(self.dir, exist_ok=True)
        if self.space_arrays is not None and not self._space_written:
            _write(os.path.join(self.dir, "space.npz"), lambda f: np.savez(
                f, **{k: np.asarray(v, dtype="<f8") for k, v in self.space_arrays.items()}))
            self._space_written = True
        if evaluations is not None and evaluations[0]:
            hashes, batch, fs, grads = evaluations
            name = f"evals-{len(self.segments) + 1:05d}"
            _write(os.path.join(self.dir, name + ".npy"),
                   lambda f: np.save(f, np.asarray(grads, dtype="<f8")))
            _write(os.path.join(self.dir, name + ".json"), lambda f: json.dump(
                {"hashes": list(hashes), "batch": [bool(b) for b in batch],
                 "f": [float(v) for v in fs]}, f), mode="w")
            self.segments.append(name)
        if state is not None:
            _write(os.path.join(self.dir, "state.npz"), lambda f: np.savez(
                f, **{k: np.asarray(v, dtype="<f8") for k, v in state.items()}))
        meta = {"format": FORMAT, "mode": self.mode, "iteration": int(iteration),
                "objectiveHistory": [float(v) for v in history],
                "objectiveTimes": [float(v) for v in times],
                "fingerprint": self.fingerprint, "params": self.params,
                "segments": self.segments, **(extra or {})}
        _write(os.path.join(self.dir, META), lambda f: json.dump(meta, f, indent=1),
               mode="w")
        self.iteration = int(iteration)

    def due(self, iteration):
        return self.interval > 0 and iteration > self.iteration and \
            iteration % self.interval == 0

    def remove(self):
        """After a fit that ended well: its checkpoint is no longer needed."""
        for name in [META, "state.npz", "space.npz"] + [s + ext for s in self.segments
                                           for ext in (".npy", ".json")]:
            try:
                os.remove(os.path.join(self.dir, name))
            except FileNotFoundError:
                pass
        try:
            os.rmdir(self.dir)
        except OSError:
            pass


#: The names of sync's evaluation files (checked on load: nothing else is opened,
#: written over or removed).
SEGMENT = re.compile(r"evals-\d{5}")


def _checked(meta, directory):
    """-> (segments, iteration) of a checkpoint's meta, every field checked: a
    checkpoint directory is input someone else may have written."""
    def bad(why):
        return SparkgdError(f"checkpoint in {directory} cannot be used: {why}")

    iteration = meta.get("iteration")
    if not isinstance(iteration, int) or isinstance(iteration, bool) or iteration < 0:
        raise bad(f"iteration {iteration!r}")
    for key in ("objectiveHistory", "objectiveTimes"):
        v = meta.get(key, [])
        if not isinstance(v, list) or not all(isinstance(x, (int, float)) and
                                              not isinstance(x, bool) for x in v):
            raise bad(f"{key} is not a list of numbers")
    segments = meta.get("segments", [])
    if not isinstance(segments, list) or not all(isinstance(n, str) and SEGMENT.fullmatch(n)
                                                 for n in segments):
        raise bad(f"segments {str(segments)[:80]} are not this format's file names")
    f_prev = meta.get("f_prev")
    if f_prev is not None and not (isinstance(f_prev, (int, float)) and
                                   math.isfinite(f_prev) or f_prev != f_prev):
        raise bad(f"f_prev {f_prev!r}")
    return list(segments), int(iteration)


def _describe(fp):
    if not fp:
        return "unknown"
    return f"{fp.get('rows')} rows, {fp.get('features')} features, weight {fp.get('weight'):g}"


class ReplayMismatch(SparkgdError):
    """The optimizer asked for another point than the log's at the same evaluation."""


class Replay:
    """sync: wraps ``fun`` (and ``batch_fun``) so every evaluation is logged, and the
    logged ones are answered from the log on resume. ``pending()`` -> what was
    evaluated since the last checkpoint; ``replaying`` while the log lasts. The log
    grows in memory too (for :class:`Recovery`) until it holds ``max_bytes``."""

    def __init__(self, log=None, max_bytes=None):
        self.hashes, self.batch, self.fs, grads = log or ([], [], [], [])
        self.hashes, self.batch, self.fs = list(self.hashes), list(self.batch), list(self.fs)
        self.grads = [row for g in grads for row in g]
        self.position = 0
        self.new = ([], [], [], [])
        self.max_bytes = max_bytes
        self.bytes = sum(g.nbytes for g in self.grads)
        self.complete = True      # the log holds every evaluation so far

    @property
    def replaying(self):
        return self.position < len(self.hashes)

    def rewind(self):
        """A new attempt of the fit: answer from the start of the log again."""
        self.position = 0

    def wrap(self, fun, batch=False):
        def wrapped(x, *args):
            h = point_hash(x)
            if self.replaying:
                k = self.position
                if self.hashes[k] != h or self.batch[k] != batch:
                    raise ReplayMismatch(
                        f"the checkpoint does not replay: evaluation {k + 1} was at another "
                        "point (another optimizer version?); start the fit afresh")
                self.position += 1
                return self.fs[k], np.array(self.grads[k])
            f, g = fun(x, *args)
            entry = (h, batch, float(f), np.array(g, dtype="<f8"))
            for part, v in zip(self.new, entry):
                part.append(v)
            if self.complete and (self.max_bytes is None or
                                  self.bytes + entry[3].nbytes <= self.max_bytes):
                for part, v in zip((self.hashes, self.batch, self.fs, self.grads), entry):
                    part.append(v)
                self.bytes += entry[3].nbytes
                self.position += 1
            else:
                self.complete = False
            return f, g

        return wrapped

    def pending(self):
        out = self.new
        self.new = ([], [], [], [])
        return out


class Recovery:
    """What one fit keeps in the driver's memory across attempts of its engine, so a
    serving task lost mid-fit costs a rebuild of the blocks, not the passes before it:
    sync's evaluation log (:class:`Replay`, up to :data:`MAX_MEMORY_BYTES` of
    gradients; beyond, a lost task starts the fit over), local's and async's model at
    the last whole round or clock (``snapshot``: a checkpoint's meta and state)."""

    #: Gradients a fit keeps in memory to go on after a lost task.
    MAX_MEMORY_BYTES = 512 << 20

    def __init__(self):
        self.replay = None
        self.iteration = 0        # sync: the last iteration reached
        self.times = []
        self.snapshot = None      # local, async: (meta, state)
        self.space = None         # the optimizer's space: start, feature moments
        self.data = None          # the fingerprint of the blocks all this was computed on

    def vouch(self, facts):
        """A new attempt's blocks: what was kept may be used only if they hold the same
        data as those it was computed on (a lost task's input might have ended early;
        a rebuild that reads the same rows says it did not). -> True when it may."""
        now = fingerprint(facts)
        if self.data is not None and not same_data(self.data, now):
            self.replay, self.snapshot, self.iteration, self.times = None, None, 0, []
            self.space = None
            self.data = now
            return False
        self.data = now
        return True


def clear_directory(directory):
    """A fit without ``resume`` in a directory holding a checkpoint: refused (nothing
    is lost); in an empty or missing one: fine."""
    if os.path.isfile(os.path.join(directory, META)):
        raise SparkgdError(
            f"checkpointDir {directory} holds a checkpoint: resume from it (--resume, "
            f"resume=True) or give an empty directory")


__all__ = ["Checkpointer", "Recovery", "Replay", "fingerprint", "decisive",
           "clear_directory", "point_hash", "same_data"]
