"""Saved models: a directory readable without sparkgd, on any Hadoop file system.

    <path>/coefficients.npy      float64, (d,) or (K, d)
    <path>/intercept.npy         float64, () or (K,)
    <path>/metadata.json         {"class", "loss", "params", "numFeatures", "numClasses",
                                  "summary", "sparkgdVersion", "uid", "modelParams"}
    <path>/metadata/part-00000   Spark ML's own metadata line (class, uid, paramMap):
                                 what ``PipelineModel.load`` and ``CrossValidatorModel.load``
                                 read to find the stage's class

``path``: a local path, a ``file:`` URI, or any URI Hadoop has a file system for
(``hdfs://``, ``s3a://``, ...; those need an active Spark session, whose Hadoop
configuration holds the credentials). From a Spark Connect session the path is the
cluster's, as Spark ML's writers take it: a model is saved by one task of a one-task
job (the files written beside the target and renamed, there) and loaded with Spark's
``binaryFile`` reader; Hadoop-FS URIs are read that way too, but written only from a
classic session (Connect has no call that writes a file or renames one). Saving writes everything to a fresh directory
beside the target and renames it into place; a model already at the target is
replaced only with ``overwrite``, and only after the new one is complete. The rename is
atomic on local disks and HDFS; object stores (S3A, GCS, ABFS without hierarchical
namespace) copy on rename, so a reader there may see a half-moved directory, and a
crash mid-rename leaves the temp directory beside the target. Loading reads JSON and
``.npy`` with ``allow_pickle=False``: nothing is unpickled or eval'd.
"""
from __future__ import annotations

import io
import json
import re
import os
import shutil
import tempfile
import time
import uuid
from urllib.parse import urlparse

import numpy as np

from . import npyio
from .errors import SparkgdError, first_line

FORMAT_VERSION = 1
#: Spark ML's metadata, one JSON line, in a directory of its own (``spark.read.text``).
SPARK_METADATA = "metadata/part-00000"


# --------------------------------------------------------------------------- file systems


def local_path(path):
    """The local path of ``path``, or None when it names another file system."""
    path = os.fspath(path)
    if path.startswith("file:"):
        u = urlparse(path)
        if u.netloc not in ("", "localhost"):
            raise SparkgdError(f"path '{path}': a file: URI names no host (file:///dir)")
        return os.path.abspath(u.path)
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", path):   # hdfs:/x, s3a://b/x, ...
        return None
    return os.path.abspath(path)


class _LocalFS:
    """Plain files (no Spark needed)."""

    def __init__(self, root):
        self.root = root

    def join(self, *parts):
        return os.path.join(*parts)

    def exists(self, p):
        return os.path.exists(p)

    def is_dir(self, p):
        return os.path.isdir(p)

    def list(self, p):
        return os.listdir(p)

    def temp_dir_beside(self, target):
        parent = os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix="." + os.path.basename(target) + ".tmp-", dir=parent)
        os.chmod(tmp, 0o755)
        return tmp

    def write(self, p, data):
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)

    def read(self, p):
        with open(p, "rb") as f:
            return f.read()

    def rename(self, src, dst):
        os.rename(src, dst)

    def delete(self, p):
        shutil.rmtree(p, ignore_errors=True)


class _HadoopFS:
    """A Hadoop ``FileSystem`` through the active Spark session's JVM."""

    def __init__(self, uri):
        from pyspark import SparkContext

        sc = SparkContext._active_spark_context
        if sc is None:
            raise SparkgdError(f"model path '{uri}': a {urlparse(uri).scheme}:// path needs "
                               "an active Spark session (its Hadoop configuration)")
        self._jvm = sc._jvm
        self._path = self._jvm.org.apache.hadoop.fs.Path
        try:
            self._fs = self._path(uri).getFileSystem(sc._jsc.hadoopConfiguration())
        except Exception as e:
            raise SparkgdError(f"model path '{uri}': {first_line(e)}") from None
        self.root = uri.rstrip("/")

    def join(self, *parts):
        return "/".join([parts[0].rstrip("/"), *parts[1:]])

    def exists(self, p):
        return bool(self._fs.exists(self._path(p)))

    def is_dir(self, p):
        return self.exists(p) and bool(self._fs.getFileStatus(self._path(p)).isDirectory())

    def list(self, p):
        return [s.getPath().getName() for s in self._fs.listStatus(self._path(p))]

    def temp_dir_beside(self, target):
        parent, name = target.rsplit("/", 1)
        tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:12]}"
        self._fs.mkdirs(self._path(tmp))
        return tmp

    def write(self, p, data):
        out = self._fs.create(self._path(p), False)
        try:
            out.write(bytearray(data))
        finally:
            out.close()

    def read(self, p):
        stream = self._fs.open(self._path(p))
        try:
            return bytes(self._jvm.org.apache.commons.io.IOUtils.toByteArray(stream))
        finally:
            stream.close()

    def rename(self, src, dst):
        if not self._fs.rename(self._path(src), self._path(dst)):
            raise OSError(f"could not rename {src} to {dst}")

    def delete(self, p):
        self._fs.delete(self._path(p), True)


def _connect_session():
    """The active Spark Connect session, or None (a classic one, or none)."""
    try:
        from pyspark.sql import SparkSession
        from pyspark.sql.utils import is_remote
    except ImportError:   # pragma: no cover
        return None
    if not is_remote():
        return None
    session = SparkSession.getActiveSession()
    return session if type(session).__module__.startswith("pyspark.sql.connect") else None


def filesystem(path):
    """``(fs, root)`` for ``path`` (see the module docstring for what it may be)."""
    local = local_path(path)
    if local is not None:
        return _LocalFS(local), local
    fs = _HadoopFS(os.fspath(path))
    return fs, fs.root


# --------------------------------------------------------------------------- save / load


def check_target(path, overwrite=True):
    """Why ``path`` cannot take a model (SparkgdError), before anything is trained."""
    fs, target = filesystem(path)
    if not fs.exists(target):
        return
    if not overwrite:
        raise SparkgdError(f"model path '{path}' already exists (use overwrite=True)")
    if not fs.is_dir(target):
        raise SparkgdError(f"model path '{path}' exists and is not a directory")
    if fs.list(target) and not fs.exists(fs.join(target, "metadata.json")):
        raise SparkgdError(f"model path '{path}' is a non-empty directory that is not a "
                           "sparkgd model; refusing to replace it")


def spark_metadata(model):
    """Spark ML's DefaultParams metadata line for ``model`` (its set and default
    params, where JSON can hold them)."""
    import pyspark

    def plain(params):
        return {p.name: v for p, v in params.items() if _jsonable(v)}

    return json.dumps({
        "class": type(model).__module__ + "." + type(model).__name__,
        "timestamp": int(time.time() * 1000),
        "sparkVersion": pyspark.__version__,
        "uid": model.uid,
        "paramMap": plain(model._paramMap),
        "defaultParamMap": plain(model._defaultParamMap),
    }, separators=(",", ":"))


def save_model(model, path, overwrite=False):
    from . import __version__

    coef = model._coef if model._coef.shape[0] > 1 else model._coef[0]
    intercept = model._intercept if model._intercept.shape[0] > 1 else model._intercept[0]
    meta = {
        "class": type(model).__name__,
        "formatVersion": FORMAT_VERSION,
        "sparkgdVersion": __version__,
        "uid": model.uid,
        "loss": model._loss_name,
        "lossParams": model._loss_params,
        "params": model._est_params,
        # the model's own output params (setThreshold, setPredictionCol, ... after fit)
        "modelParams": {p.name: v for p, v in model._paramMap.items() if _jsonable(v)},
        "numFeatures": int(model._coef.shape[1]),
        "numClasses": model._num_classes,
        "summary": model._summary.to_dict() if model._summary is not None else None,
    }
    files = {"coefficients.npy": _npy(coef), "intercept.npy": _npy(intercept),
             "metadata.json": (json.dumps(meta, indent=2, default=_json_default) + "\n").encode(),
             SPARK_METADATA: (spark_metadata(model) + "\n").encode()}
    session = _connect_session()
    if session is not None:
        _on_the_cluster(session, path, files, overwrite)
        return
    fs, target = filesystem(path)
    check_target(path, overwrite)
    write_dir(fs, target, files)


def write_dir(fs, target, files):
    """``files`` (name -> bytes) as the directory ``target``: written beside it, then
    renamed into place (a model already there is renamed aside first, and back if the
    rename fails)."""
    tmp = fs.temp_dir_beside(target)
    try:
        for name, data in files.items():
            fs.write(fs.join(tmp, *name.split("/")), data)
        if fs.exists(target):
            old = tmp + ".old"
            fs.rename(target, old)
            fs.rename(tmp, target)
            fs.delete(old)
        else:
            fs.rename(tmp, target)
    except BaseException:
        if fs.exists(tmp + ".old") and not fs.exists(target):
            fs.rename(tmp + ".old", target)      # the old model back in place
        fs.delete(tmp)
        raise


def _on_the_cluster(session, path, files, overwrite):
    """A Connect session's save: one task writes the directory on the cluster's file
    system (its one-line error, if any, comes back as the job's output)."""
    local = local_path(path)
    if local is None:
        raise SparkgdError(
            f"model path '{path}': a Spark Connect session cannot write a Hadoop-FS path "
            "(Connect has no call that writes or renames a file); save to a path of the "
            "cluster's own file system (a shared mount), or from a classic session")
    import pyarrow as pa

    def write(_batches, _local=local, _files=files, _overwrite=overwrite):
        try:
            check_target(_local, _overwrite)
            write_dir(_LocalFS(_local), _local, _files)
            error = ""
        except SparkgdError as e:
            error = str(e)
        yield pa.RecordBatch.from_pydict({"error": [error]})

    row = session.range(1, numPartitions=1).mapInArrow(write, "error string").head()
    if row["error"]:
        raise SparkgdError(row["error"].replace(local, os.fspath(path)))


def _read_on_the_cluster(session, path, names):
    """A Connect session's load: the named files of the directory ``path``, with
    Spark's ``binaryFile`` reader (any file system the cluster reads) -> name -> bytes;
    a missing file is missing from the result."""
    root = os.fspath(path).rstrip("/")
    local = local_path(root)
    if local is not None:
        root = "file://" + local
    out = {}
    for name in names:
        try:
            rows = session.read.format("binaryFile").load(f"{root}/{name}") \
                .select("content").collect()
        except Exception as e:
            text = first_line(e)
            if "PATH_NOT_FOUND" in text or "does not exist" in text:
                continue
            raise SparkgdError(f"cannot read model '{path}': {text}") from None
        if rows:
            out[name] = bytes(rows[0]["content"])
    return out


def _npy(a):
    buf = io.BytesIO()
    np.save(buf, np.asarray(a, dtype=np.float64), allow_pickle=False)
    return buf.getvalue()


def _jsonable(v):
    try:
        json.dumps(v, default=_json_default)
        return True
    except (TypeError, ValueError):
        return False


def _json_default(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"not JSON serializable: {type(v).__name__}")


def read_shape_k(meta):
    """Coefficient rows a saved model may hold: K for multinomial (numClasses), else 1."""
    k = meta.get("numClasses")
    if meta.get("loss") == "multinomial":
        if not isinstance(k, int) or isinstance(k, bool) or not 2 <= k <= 1 << 20:
            raise ValueError(f"numClasses {k!r}")
        return k
    return 1


def load_model(path, classes, expected=None):
    """Read a model written by ``model.save``. ``classes``: saved class name -> model
    class (:data:`sparkgd.estimators.MODEL_CLASSES`; a name is looked up, never eval'd);
    ``expected``: the class it must be (``LogisticRegressionModel.load``)."""
    from .summary import TrainingSummary

    names = ("metadata.json", "coefficients.npy", "intercept.npy")
    session = _connect_session()
    if session is not None:
        read = _read_on_the_cluster(session, path, names)
    else:
        fs, root = filesystem(path)

        def one(name):
            p = fs.join(root, name)
            return fs.read(p) if fs.exists(p) else None
        read = {name: one(name) for name in names}
    if read.get("metadata.json") is None:
        raise SparkgdError(f"'{path}' is not a saved sparkgd model (no metadata.json)")
    try:
        if read.get("coefficients.npy") is None or read.get("intercept.npy") is None:
            raise OSError("coefficients.npy or intercept.npy is missing")
        meta = json.loads(read["metadata.json"])
        d = meta["numFeatures"]
        if not isinstance(d, int) or isinstance(d, bool) or not 0 < d < 1 << 31:
            raise ValueError(f"numFeatures {d!r}")
        k = int(read_shape_k(meta))
        # the headers first: a file that claims (2^40,) values is refused unread
        coef = npyio.read_bytes(read["coefficients.npy"],
                                lambda s: s in ((d,), (k, d)), max_values=k * d,
                                what="coefficients.npy")
        intercept = npyio.read_bytes(read["intercept.npy"],
                                     lambda s: s in ((), (1,), (k,)), max_values=k,
                                     what="intercept.npy")
        cls = classes.get(meta.get("class"))
        if cls is None:
            raise ValueError(f"unknown model class {meta.get('class')!r}")
        if expected is not None and not issubclass(cls, expected):
            raise ValueError(f"it holds a {cls.__name__}, not a {expected.__name__}")
        d = int(meta["numFeatures"])
        coef = np.asarray(coef, dtype=np.float64).reshape(-1, d)
        intercept = np.atleast_1d(np.asarray(intercept, dtype=np.float64))
        if d < 1 or intercept.shape != (coef.shape[0],):
            raise ValueError(f"coefficients {coef.shape} and intercept {intercept.shape} "
                             "do not fit together")
        summary = TrainingSummary.from_dict(meta["summary"]) if meta.get("summary") else None
        model = cls._from_fit(coef, intercept, meta["loss"], meta.get("numClasses"), summary,
                              meta.get("lossParams"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise SparkgdError(f"cannot read model '{path}': {e}") from None
    if isinstance(meta.get("uid"), str):
        model._resetUid(meta["uid"])
    params = meta.get("params") or {}
    model._est_params = params
    own = meta.get("modelParams") or {}
    if own:   # the model's own map decides threshold(s): both from params may disagree
        params = {k: v for k, v in params.items() if k not in ("threshold", "thresholds")}
    for name, value in [*params.items(), *own.items()]:
        if model.hasParam(name) and value is not None and name != "initialModel":
            try:
                model._set(**{name: value})
            except (TypeError, ValueError) as e:
                raise SparkgdError(f"cannot read model '{path}': param {name}: {e}") from None
    return model
