"""Evaluation metrics with Spark ML's names, from one distributed pass.

:func:`evaluate` scores a DataFrame with a model and aggregates, in one Spark job, the
few sums every metric derives from:

* regression: weighted sums of y, y², prediction, prediction², error², |error| ->
  ``r2``, ``r2adj``, ``meanSquaredError``, ``rootMeanSquaredError``,
  ``meanAbsoluteError``, ``explainedVariance`` (Spark's ``RegressionMetrics``: SSreg / W);
* classification: the weighted confusion matrix (label x prediction) and the log-loss
  sum; for two classes also counts of positives and negatives per score bin (the margin
  relative steps of :data:`AUC_BINS_PER_OCTAVE` per octave -- scores closer than that
  count as tied, which is what bounds the ROC area's error, whatever the margins' scale) -> ``accuracy``, per-label and weighted
  precision/recall/F-measure/TPR/FPR, ``areaUnderROC``, ``logLoss``.

The sums are kept as a small JSON-able dict (saved with the model) and the summary
classes compute each metric from it, as properties named as Spark ML's summaries name
them.
"""
from __future__ import annotations

import math

import numpy as np

#: Score bins per octave of |margin| for the ROC area: bins are 2^(1/512) - 1 = 0.14%
#: of the score wide, whatever its scale (scores that close count as tied).
AUC_BINS_PER_OCTAVE = 512
#: Spark's LogLoss clamps probabilities to [eps, 1 - eps].
LOG_LOSS_EPS = 1e-15


def evaluate(model, dataset):
    """The metrics of ``model`` on ``dataset`` (a summary object; see the classes
    below), from one aggregation job."""
    from .engine.jobs import described_in
    from .errors import SparkgdError

    if model.getLabelCol() not in dataset.columns:
        raise SparkgdError(f"metrics need the label column '{model.getLabelCol()}' in the "
                           "DataFrame (a LIBSVM text input holds it inside each line)")
    scored = model.transform(dataset)
    with described_in(dataset.sparkSession, "sparkgd: evaluate"):
        return _evaluate(model, scored)


def _evaluate(model, scored):
    if model._loss_name in ("squared", "huber"):
        cls, sums = RegressionSummary, _regression_sums(model, scored)
    else:
        cls = BinaryClassificationSummary if model._coef.shape[0] == 1 else \
            ClassificationSummary
        sums = _classification_sums(model, scored)
    sums.update(predictionCol=model.getPredictionCol(), labelCol=model.getLabelCol(),
                featuresCol=model.getFeaturesCol(),
                weightCol=model.getWeightCol() if model.isSet(model.weightCol) else None)
    return cls(sums, scored)


def _weight(model, scored):
    from pyspark.sql import functions as F

    if model.isSet(model.weightCol) and model.getWeightCol() and \
            model.getWeightCol() in scored.columns:
        return F.col(model.getWeightCol()).cast("double")
    return F.lit(1.0)


def _regression_sums(model, scored):
    from pyspark.sql import functions as F

    y = F.col(model.getLabelCol()).cast("double")
    p = F.col(model.getPredictionCol())
    w = _weight(model, scored)
    rows = scored.where(p.isNotNull() & y.isNotNull())
    e = p - y
    r = rows.agg(F.count(F.lit(1)), F.sum(w), F.sum(w * w), F.sum(w * y), F.sum(w * y * y),
                 F.sum(w * p), F.sum(w * p * p), F.sum(w * e * e), F.sum(w * F.abs(e))).first()
    keys = ("n", "W", "Sww", "Sy", "Syy", "Sp", "Spp", "See", "Sae")
    sums = {k: float(v or 0.0) for k, v in zip(keys, r)}
    sums.update(kind="regression", numFeatures=model.numFeatures,
                fitIntercept=bool(model.getFitIntercept()))
    return sums


def _classification_sums(model, scored):
    from pyspark.ml.functions import vector_to_array
    from pyspark.sql import functions as F

    y = F.col(model.getLabelCol()).cast("double")
    pred = F.col(model.getPredictionCol())
    w = _weight(model, scored)
    binary = model._coef.shape[0] == 1
    raw = vector_to_array(F.col(model.getRawPredictionCol()))
    score = raw[1] if binary else F.lit(0.0)
    if "probabilityCol" in [p.name for p in model.params] and \
            model.getProbabilityCol() in scored.columns:
        prob = vector_to_array(F.col(model.getProbabilityCol()))
        # (a label outside the classes gets no probability: null, not an error)
        p_true = F.greatest(F.least(F.try_element_at(prob, y.cast("int") + 1),
                                    F.lit(1 - LOG_LOSS_EPS)), F.lit(LOG_LOSS_EPS))
        nll = -F.log(p_true)
    else:
        nll = F.lit(None).cast("double")
    rows = scored.where(pred.isNotNull() & y.isNotNull())
    bin_ = _score_bin(score) if binary else F.lit(0).cast("long")
    groups = (rows.groupBy(y.alias("y"), pred.alias("p"), bin_.alias("b"))
              .agg(F.count(F.lit(1)).alias("n"), F.sum(w).alias("w"),
                   F.sum(w * nll).alias("nll"))
              .collect())
    labels = sorted({float(g["y"]) for g in groups} | {float(g["p"]) for g in groups})
    index = {v: i for i, v in enumerate(labels)}
    confusion = np.zeros((len(labels), len(labels)))
    n, nll_sum, has_nll = 0, 0.0, True
    bins = {}
    for g in groups:
        confusion[index[float(g["y"])], index[float(g["p"])]] += g["w"]
        n += g["n"]
        if g["nll"] is None:
            has_nll = False
        else:
            nll_sum += g["nll"]
        if binary:
            pos_neg = bins.setdefault(int(g["b"]), [0.0, 0.0])
            pos_neg[0 if g["y"] == 1.0 else 1] += g["w"]
    sums = {"kind": "binary" if binary else "multiclass", "labels": labels,
            "true": sorted({float(g["y"]) for g in groups}),
            "confusion": confusion.tolist(), "n": n,
            "nll": nll_sum if has_nll else None}
    if binary:
        sums["auc"] = roc_area([(b, pn[0], pn[1]) for b, pn in bins.items()])
    return sums


def _score_bin(score):
    """A long that orders as ``score`` does, equal for scores within one bin of
    :data:`AUC_BINS_PER_OCTAVE` (sign, then octave and fraction of |score|; 0 apart)."""
    from pyspark.sql import functions as F

    octaves = F.floor(F.log2(F.abs(score)) * F.lit(AUC_BINS_PER_OCTAVE)) + F.lit(1 << 20)
    return (F.when(score == 0, F.lit(0)).otherwise(F.signum(score) * octaves)).cast("long")


def roc_area(bins):
    """Area under the ROC curve from ``[(score, positives, negatives), ...]`` (weights),
    ties counted as half (the curve's diagonal through a bin); NaN with one class."""
    bins = sorted(bins, key=lambda t: -t[0])
    pos = sum(b[1] for b in bins)
    neg = sum(b[2] for b in bins)
    if pos <= 0 or neg <= 0:
        return float("nan")
    area, tp = 0.0, 0.0
    for _s, p, n in bins:
        area += n * (tp + p / 2.0)
        tp += p
    return area / (pos * neg)


# --------------------------------------------------------------------------- summaries


class _Summary:
    """Metrics from the sums of :func:`evaluate` (``sums``); ``predictions``: the
    scored DataFrame when it was computed in this session (None once loaded)."""

    def __init__(self, sums, predictions=None):
        self._sums = sums
        self._predictions = predictions
        self.predictionCol = sums.get("predictionCol")
        self.labelCol = sums.get("labelCol")
        self.featuresCol = sums.get("featuresCol")
        self.weightCol = sums.get("weightCol")

    @property
    def predictions(self):
        if self._predictions is None:
            raise RuntimeError("the scored DataFrame is not kept with a saved summary; "
                               "call model.evaluate(df)")
        if callable(self._predictions):      # the training data, scored when first asked
            self._predictions = self._predictions()
        return self._predictions

    @property
    def numInstances(self):
        return int(self._sums["n"])

    def to_dict(self):
        return dict(self._sums)


class RegressionSummary(_Summary):
    """Spark ML's ``LinearRegressionSummary`` names."""

    @property
    def _mean(self):
        return self._sums["Sy"] / self._sums["W"]

    @property
    def meanSquaredError(self):
        return self._sums["See"] / self._sums["W"]

    @property
    def rootMeanSquaredError(self):
        return math.sqrt(self.meanSquaredError)

    @property
    def meanAbsoluteError(self):
        return self._sums["Sae"] / self._sums["W"]

    @property
    def explainedVariance(self):
        s, m = self._sums, self._mean
        return max(0.0, s["Spp"] - 2 * m * s["Sp"] + m * m * s["W"]) / s["W"]

    @property
    def r2(self):
        s = self._sums
        if s["fitIntercept"]:
            # Spark's RegressionMetrics: SStot = unbiased weighted variance x (W - 1)
            spread = s["Syy"] - s["Sy"] ** 2 / s["W"]
            effective = s["W"] - s.get("Sww", s["W"]) / s["W"]
            total = spread / effective * (s["W"] - 1) if effective > 0 else 0.0
        else:
            total = s["Syy"]           # through the origin
        return 1.0 - s["See"] / total if total > 0 else float("nan")

    @property
    def degreesOfFreedom(self):
        s = self._sums
        return int(s["n"]) - int(s["numFeatures"]) - (1 if s["fitIntercept"] else 0)

    @property
    def r2adj(self):
        s = self._sums
        k = 1 if s["fitIntercept"] else 0
        return 1.0 - (1.0 - self.r2) * (s["n"] - k) / self.degreesOfFreedom \
            if self.degreesOfFreedom > 0 else float("nan")

    @property
    def residuals(self):
        from pyspark.sql import functions as F

        return self.predictions.select(
            (F.col(self.labelCol) - F.col(self.predictionCol)).alias("residuals"))


class ClassificationSummary(_Summary):
    """Spark ML's ``LogisticRegressionSummary`` names (multiclass)."""

    @property
    def _c(self):
        return np.asarray(self._sums["confusion"], dtype=np.float64)

    @property
    def labels(self):
        """The labels present in the data (as Spark's MulticlassMetrics.labels)."""
        return list(self._sums.get("true", self._sums["labels"]))

    @property
    def _rows(self):
        """Indices of :attr:`labels` in the confusion matrix."""
        index = {v: i for i, v in enumerate(self._sums["labels"])}
        return [index[v] for v in self.labels]

    @property
    def accuracy(self):
        c = self._c
        return float(np.trace(c) / c.sum())

    def _per_label(self, num, den):
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)
        return [float(v) for v in np.asarray(out)[self._rows]]

    @property
    def truePositiveRateByLabel(self):
        c = self._c
        return self._per_label(np.diag(c), c.sum(axis=1))

    recallByLabel = truePositiveRateByLabel

    @property
    def falsePositiveRateByLabel(self):
        c = self._c
        fp = c.sum(axis=0) - np.diag(c)
        return self._per_label(fp, c.sum() - c.sum(axis=1))

    @property
    def precisionByLabel(self):
        c = self._c
        return self._per_label(np.diag(c), c.sum(axis=0))

    def fMeasureByLabel(self, beta=1.0):
        b2 = beta * beta
        p, r = np.array(self.precisionByLabel), np.array(self.recallByLabel)
        den = b2 * p + r
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(den > 0, (1 + b2) * p * r / np.where(den > 0, den, 1), 0.0)
        return [float(v) for v in out]

    def _weighted(self, values):
        c = self._c
        return float(np.dot(c.sum(axis=1)[self._rows] / c.sum(), values))

    @property
    def weightedTruePositiveRate(self):
        return self._weighted(self.truePositiveRateByLabel)

    weightedRecall = weightedTruePositiveRate

    @property
    def weightedFalsePositiveRate(self):
        return self._weighted(self.falsePositiveRateByLabel)

    @property
    def weightedPrecision(self):
        return self._weighted(self.precisionByLabel)

    def weightedFMeasure(self, beta=1.0):
        return self._weighted(self.fMeasureByLabel(beta))

    @property
    def logLoss(self):
        """Mean of -log p(true label) (weighted); None for a model without
        probabilities (LinearSVC)."""
        nll = self._sums.get("nll")
        return None if nll is None else nll / self._c.sum()


class BinaryClassificationSummary(ClassificationSummary):
    """... and ``BinaryLogisticRegressionSummary``'s ``areaUnderROC``."""

    @property
    def areaUnderROC(self):
        return self._sums["auc"]


def from_dict(sums, predictions=None):
    """The summary object of saved sums (``predictions``: the scored DataFrame, or a
    function that makes it; none for a loaded model)."""
    cls = {"regression": RegressionSummary, "binary": BinaryClassificationSummary,
           "multiclass": ClassificationSummary}[sums["kind"]]
    return cls(sums, predictions)


# --------------------------------------------------------------- sums from the blocks
#
# The training summary's metrics come from the blocks the serving tasks hold, in one
# more pass at the returned coefficients (no second read of the input): every task
# adds up a fixed-size vector (:func:`block_sums`), the topology sums them like a
# gradient, and :func:`sums_from_vector` turns the total into the dict the summaries
# read -- the same dict :func:`evaluate` makes with Spark SQL.

#: The ROC area's score bins cover |margin| in [2^-OCTAVES, 2^OCTAVES) (beyond, scores
#: count as tied with the outermost bin's), AUC_BINS_PER_OCTAVE to an octave, per sign.
OCTAVES = 32
_LEVELS = 2 * OCTAVES * AUC_BINS_PER_OCTAVE
#: Bins: negative scores (most negative first), zero, positive scores.
SCORE_BINS = 2 * _LEVELS + 1
#: Largest number of classes whose confusion matrix the blocks' pass carries.
MAX_BLOCK_CLASSES = 1024
_REGRESSION = ("n", "W", "Sww", "Sy", "Syy", "Sp", "Spp", "See", "Sae")


def rule_of(model_kind, loss_name, num_classes, threshold=None, thresholds=None):
    """How a model predicts, as plain values (what :func:`block_sums` needs):
    ``model_kind`` ``regression``, ``logistic`` or ``svc``."""
    if model_kind == "regression":
        return {"kind": "regression"}
    k = 2 if loss_name != "multinomial" else int(num_classes)
    return {"kind": "binary" if loss_name != "multinomial" else "multiclass", "k": k,
            "score": "hinge" if model_kind == "svc" else loss_name,
            "threshold": None if threshold is None else float(threshold),
            "thresholds": None if thresholds is None else [float(t) for t in thresholds]}


def vector_size(rule):
    """Floats in :func:`block_sums`' vector."""
    if rule["kind"] == "regression":
        return len(_REGRESSION)
    k = rule["k"]
    return 2 + 2 * k + k * k + (2 * SCORE_BINS if rule["kind"] == "binary" else 0)


def score_bins(z):
    """The bin of each score: ordered as the scores, equal within one of
    :data:`AUC_BINS_PER_OCTAVE` per octave of |z| (as :func:`_score_bin`), clamped to
    :data:`OCTAVES` octaves either side of 1."""
    z = np.asarray(z, dtype=np.float64)
    out = np.full(z.shape, _LEVELS, dtype=np.int64)          # zero
    nz = z != 0
    with np.errstate(divide="ignore"):
        level = np.floor(np.log2(np.abs(z[nz])) * AUC_BINS_PER_OCTAVE)
    level = np.clip(level, -OCTAVES * AUC_BINS_PER_OCTAVE,
                    OCTAVES * AUC_BINS_PER_OCTAVE - 1).astype(np.int64) + \
        OCTAVES * AUC_BINS_PER_OCTAVE
    out[nz] = np.where(z[nz] > 0, _LEVELS + 1 + level, _LEVELS - 1 - level)
    return out


def _predict(z, rule):
    """Predictions (class indices as floats) from margins ``z`` (n, K), as the
    model's ``transform`` makes them."""
    if rule["score"] == "hinge":
        return (z[:, 0] > rule["threshold"]).astype(np.float64)
    if rule["kind"] == "binary":
        p1 = 1.0 / (1.0 + np.exp(-z[:, 0]))
        t = rule["threshold"] if rule["thresholds"] is None else \
            1.0 / (1.0 + rule["thresholds"][0] / rule["thresholds"][1])
        return (p1 > t).astype(np.float64)
    if rule["thresholds"] is not None:
        e = np.exp(z - z.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
        t = np.asarray(rule["thresholds"], dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            scaled = np.where(t > 0, p / np.where(t > 0, t, 1), np.where(p > 0, np.inf, 0.0))
        return np.argmax(scaled, axis=1).astype(np.float64)
    return np.argmax(z, axis=1).astype(np.float64)


def _nll(z, y, rule):
    """-log p(true label), clamped as Spark's LogLoss; None without probabilities."""
    if rule["score"] == "hinge":
        return None
    if rule["kind"] == "binary":
        p1 = 1.0 / (1.0 + np.exp(-z[:, 0]))
        p = np.where(y == 1.0, p1, 1.0 - p1)
    else:
        e = np.exp(z - z.max(axis=1, keepdims=True))
        p = (e / e.sum(axis=1, keepdims=True))[np.arange(z.shape[0]), y.astype(np.int64)]
    return -np.log(np.clip(p, LOG_LOSS_EPS, 1 - LOG_LOSS_EPS))


def block_sums(blocks, coef, intercept, rule):
    """One task's metric sums over its ``(X, y, w)`` blocks at ``coef`` (K, d) and
    ``intercept`` (K,): a float64 vector of :func:`vector_size` (add them up over
    tasks; :func:`sums_from_vector` reads the total)."""
    from . import kernels

    out = np.zeros(vector_size(rule))
    d = coef.shape[1]
    for X, y, w in blocks:
        for Xc, yc, wc in kernels.row_chunks(X, y, w):
            if yc.shape[0] == 0:
                continue
            Xc = kernels.as_float64(Xc, d)
            z = kernels.margins(Xc, coef, intercept)
            wt = np.ones(yc.shape[0]) if wc is None else np.asarray(wc, dtype=np.float64)
            if rule["kind"] == "regression":
                p, e = z[:, 0], z[:, 0] - yc
                out += [yc.shape[0], wt.sum(), wt @ wt, wt @ yc, wt @ (yc * yc), wt @ p,
                        wt @ (p * p), wt @ (e * e), wt @ np.abs(e)]
                continue
            k = rule["k"]
            pred = _predict(z, rule).astype(np.int64)
            yi = yc.astype(np.int64)
            out[0] += yc.shape[0]
            nll = _nll(z, yc, rule)
            if nll is not None:
                out[1] += wt @ nll
            at = 2
            out[at:at + k] += np.bincount(yi, minlength=k)[:k]
            at += k
            out[at:at + k] += np.bincount(pred, minlength=k)[:k]
            at += k
            out[at:at + k * k] += np.bincount(yi * k + pred, weights=wt,
                                              minlength=k * k)[:k * k]
            at += k * k
            if rule["kind"] == "binary":
                b = score_bins(z[:, 0])
                pos = yc == 1.0
                out[at:at + SCORE_BINS] += np.bincount(b[pos], weights=wt[pos],
                                                       minlength=SCORE_BINS)
                out[at + SCORE_BINS:] += np.bincount(b[~pos], weights=wt[~pos],
                                                     minlength=SCORE_BINS)
    return out


def sums_from_vector(total, rule, num_features, fit_intercept):
    """The sums dict of :func:`evaluate` from :func:`block_sums`' total."""
    total = np.asarray(total, dtype=np.float64)
    if rule["kind"] == "regression":
        sums = {k: float(v) for k, v in zip(_REGRESSION, total)}
        sums.update(kind="regression", numFeatures=int(num_features),
                    fitIntercept=bool(fit_intercept))
        return sums
    k = rule["k"]
    at = 2
    rows, cols = total[at:at + k], total[at + k:at + 2 * k]
    at += 2 * k
    confusion = total[at:at + k * k].reshape(k, k)
    at += k * k
    labels = [i for i in range(k) if rows[i] > 0 or cols[i] > 0]
    sums = {"kind": rule["kind"], "labels": [float(i) for i in labels],
            "true": [float(i) for i in range(k) if rows[i] > 0],
            "confusion": confusion[np.ix_(labels, labels)].tolist(), "n": int(total[0]),
            "nll": None if rule["score"] == "hinge" else float(total[1])}
    if rule["kind"] == "binary":
        pos, neg = total[at:at + SCORE_BINS], total[at + SCORE_BINS:]
        seen = np.flatnonzero((pos > 0) | (neg > 0))
        sums["auc"] = roc_area([(int(b), float(pos[b]), float(neg[b])) for b in seen])
    return sums
