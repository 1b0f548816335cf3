"""Saved models: a directory readable without sparkgd.

    <path>/coefficients.npy   float64, (d,) or (K, d)
    <path>/intercept.npy      float64, () or (K,)
    <path>/metadata.json      {"class", "loss", "params", "numFeatures", "numClasses",
                               "summary", "sparkgdVersion"}

Saving is atomic: everything is written to a fresh directory beside the target
and renamed into place; a model already at the target is replaced only when
``overwrite`` is set, and only after the new one is complete. Loading reads
JSON and ``.npy`` with ``allow_pickle=False``: nothing is unpickled or eval'd.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np

from .errors import SparkgdError

FORMAT_VERSION = 1


def _local_path(path):
    path = os.fspath(path)
    if path.startswith("file://"):
        path = path[len("file://"):]
    elif "://" in path:
        raise SparkgdError(f"model path '{path}': only local paths are supported")
    return os.path.abspath(path)


def save_model(model, path, overwrite=False):
    from . import __version__

    target = _local_path(path)
    parent = os.path.dirname(target)
    if os.path.exists(target) and not overwrite:
        raise SparkgdError(f"model path '{path}' already exists (use overwrite=True)")
    if os.path.exists(target) and not os.path.isdir(target):
        raise SparkgdError(f"model path '{path}' exists and is not a directory")
    os.makedirs(parent, exist_ok=True)
    coef = model._coef if model._coef.shape[0] > 1 else model._coef[0]
    intercept = model._intercept if model._intercept.shape[0] > 1 else model._intercept[0]
    meta = {
        "class": type(model).__name__,
        "formatVersion": FORMAT_VERSION,
        "sparkgdVersion": __version__,
        "loss": model._loss_name,
        "lossParams": model._loss_params,
        "params": model._est_params,
        "numFeatures": int(model._coef.shape[1]),
        "numClasses": model._num_classes,
        "summary": model._summary.to_dict() if model._summary is not None else None,
    }
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(target) + ".tmp-", dir=parent)
    try:
        np.save(os.path.join(tmp, "coefficients.npy"), np.asarray(coef, dtype=np.float64))
        np.save(os.path.join(tmp, "intercept.npy"), np.asarray(intercept, dtype=np.float64))
        with open(os.path.join(tmp, "metadata.json"), "w") as f:
            json.dump(meta, f, indent=2, default=_json_default)
            f.write("\n")
        os.chmod(tmp, 0o755)
        if os.path.exists(target):
            old = tmp + ".old"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _json_default(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"not JSON serializable: {type(v).__name__}")


def load_model(path, classes):
    """Read a model written by ``model.save``. ``classes``: saved class name -> model
    class (:data:`sparkgd.estimators.MODEL_CLASSES`; a name is looked up, never eval'd)."""
    from .summary import TrainingSummary

    root = _local_path(path)
    meta_path = os.path.join(root, "metadata.json")
    if not os.path.isfile(meta_path):
        raise SparkgdError(f"'{path}' is not a saved sparkgd model (no metadata.json)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        coef = np.load(os.path.join(root, "coefficients.npy"), allow_pickle=False)
        intercept = np.load(os.path.join(root, "intercept.npy"), allow_pickle=False)
        cls = classes.get(meta.get("class"))
        if cls is None:
            raise ValueError(f"unknown model class {meta.get('class')!r}")
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
    params = meta.get("params") or {}
    model._est_params = params
    for name, value in params.items():
        if model.hasParam(name) and value is not None and name != "initialModel":
            try:
                model._set(**{name: value})
            except (TypeError, ValueError) as e:
                raise SparkgdError(f"cannot read model '{path}': param {name}: {e}") from None
    return model
