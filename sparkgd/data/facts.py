"""The facts of the rows a fit reads, and how the facts of two row sets combine.

Every store reports, per block or per task, :func:`block_info`: rows, width, weight
sum, label range and histogram, and the feature moments (:mod:`sparkgd.stats`).
:func:`merge_infos` combines two; :class:`Facts` is what the driver knows of the whole
input once the blocks are built, after :func:`check` has refused bad input. NumPy only.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..errors import SparkgdError
from ..stats import block_moments, merge_moments


def block_key(info):
    """A block's identity that survives recomputation: (partition, position in it, rows)."""
    return int(info["part"]), int(info["seq"]), int(info["n"])


def block_info(X, y, w, moments=True):
    """Small per-block facts the driver checks: sizes, label range, weight sum (and,
    with ``moments``, the feature moments up to :data:`MAX_MOMENT_FEATURES`)."""
    n = int(y.shape[0])
    return {
        "n": n,
        "d": int(X.shape[1]),
        "wsum": float(n if w is None else w.sum()),
        "ymin": float(y.min()) if n else None,
        "ymax": float(y.max()) if n else None,
        "yint": bool(np.all(y == np.round(y))) if n else True,
        "nnz": int(X.nnz) if sp.issparse(X) else int(X.size),
        "yw": label_weights(y, w),
        "moments": _moments(X, w) if moments else None,
    }


#: Blocks with at most this many features carry their feature moments in their facts
#: (computed while the batch is in memory), so a fit needs no pass to get them. The facts
#: of every block go to the driver as JSON: 1026 numbers (about 20 KB) per block here.
MAX_MOMENT_FEATURES = 512


def _moments(X, w):
    d = X.shape[1]
    return block_moments(X, w, d).tolist() if d <= MAX_MOMENT_FEATURES else None


#: Labels up to this value get a weighted histogram in the block facts (Spark ML's
#: label summary): it sets the starting intercepts of a classifier.
MAX_HISTOGRAM_LABEL = 1000


def label_weights(y, w):
    """Weighted count of each label 0, 1, ..., max(y) -- or None when the labels are
    not small non-negative integers."""
    if y.shape[0] == 0:
        return []
    lo, hi = float(y.min()), float(y.max())
    if lo < 0 or hi >= MAX_HISTOGRAM_LABEL or not np.all(y == np.round(y)):
        return None
    return np.bincount(y.astype(np.int64), weights=w, minlength=int(hi) + 1).tolist()


def merge_label_weights(a, b):
    if a is None or b is None:
        return None
    if len(a) < len(b):
        a, b = b, a
    return [x + (b[i] if i < len(b) else 0.0) for i, x in enumerate(a)]


def merge_infos(a, b):
    """Combine the facts of two row sets (see ``data.block_info``)."""
    return {"n": a["n"] + b["n"], "d": max(a["d"], b["d"]), "wsum": a["wsum"] + b["wsum"],
            "ymin": min(a["ymin"], b["ymin"]), "ymax": max(a["ymax"], b["ymax"]),
            "yint": a["yint"] and b["yint"], "nnz": a["nnz"] + b["nnz"],
            "yw": merge_label_weights(a.get("yw"), b.get("yw")),
            "moments": None if a.get("moments") is None or b.get("moments") is None
            else merge_moments(np.asarray(a["moments"]), np.asarray(b["moments"])).tolist()}


def check(infos, spec, source):
    """Refuse what the executors found wrong, and input a fit cannot use: bad values
    (the first message), no rows, rows of different lengths, weights summing to 0."""
    errors = [i["error"] for i in infos if "error" in i]
    if errors:
        raise SparkgdError(f"bad input in {source}: {errors[0]}")
    if not infos or sum(i["n"] for i in infos) == 0:
        raise SparkgdError(f"no rows in {source}")
    dims = sorted({i["d"] for i in infos})
    if len(dims) > 1 and spec.kind != "libsvm":   # LIBSVM: the largest index decides
        raise SparkgdError(
            f"{spec.feature_desc} in {source}: rows have different lengths "
            f"({', '.join(map(str, dims[:5]))})")
    if spec.weight is not None and sum(i["wsum"] for i in infos) <= 0:
        raise SparkgdError(f"weight column '{spec.weight}' in {source} sums to 0")


class Facts:
    """What the driver knows of a fit's input: per block (or task), :func:`block_info`.

    ``num_features``: the width the fit works at -- for sparse data the columns some row
    touches (``columns``, sorted: the fit's column j is the data's ``columns[j]``) out of
    the data's ``width``; for dense data both are the data's width, ``columns`` None."""

    def __init__(self, infos, spec, num_partitions, columns=None, width=None):
        self.infos = infos
        self.spec = spec
        self.num_rows = sum(i["n"] for i in infos)
        self.num_features = max(i["d"] for i in infos) if infos else 0
        self.num_partitions = num_partitions   # of the data, as read or repartitioned
        self.columns = columns
        self.width = self.num_features if width is None else int(width)

    def label_weights(self):
        """Weighted count of each class label 0, 1, ... (None if labels are not such)."""
        out = []
        for i in self.infos:
            out = merge_label_weights(out, i.get("yw"))
        return None if out is None else np.asarray(out, dtype=np.float64)

    def label_range(self):
        lo = min(i["ymin"] for i in self.infos)
        hi = max(i["ymax"] for i in self.infos)
        return lo, hi, all(i["yint"] for i in self.infos)

    def moment_parts(self):
        """Every block's feature moments, when all of them came with their facts."""
        if self.infos and all(i.get("moments") is not None for i in self.infos):
            return [np.asarray(i["moments"], dtype=np.float64) for i in self.infos]
        return None
