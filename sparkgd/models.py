"""Fitted models: scoring, thresholds, persistence.

A model holds its coefficients ``(K, d)`` and intercepts ``(K,)`` as NumPy arrays, the
loss it was fitted with and its training summary. ``transform`` scores a DataFrame on
executors (:mod:`sparkgd.transform`); ``predict*`` score one vector here; ``save`` and
``load`` write and read DESIGN section 4's layout plus Spark ML's ``metadata/``
(:mod:`sparkgd.persist`), so ``Pipeline``/``CrossValidator`` save and load them too.
"""
from __future__ import annotations

import numpy as np
from pyspark.ml import Model
from pyspark.ml.param import Param
from pyspark.ml.param.shared import (
    HasProbabilityCol,
    HasRawPredictionCol,
    HasThreshold,
    HasThresholds,
)
from pyspark.ml.util import MLReadable, MLReader, MLWritable, MLWriter

from . import kernels, metrics
from .params import _SparkgdParams


def _scaled(p, thresholds):
    """Spark ML's ``probability / thresholds`` (a zero threshold wins where p > 0)."""
    t = np.asarray(thresholds, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(t > 0, p / np.where(t > 0, t, 1), np.where(p > 0, np.inf, 0.0))


class _Thresholds(HasProbabilityCol, HasRawPredictionCol, HasThreshold, HasThresholds):
    """``threshold`` and ``thresholds`` as Spark ML's LogisticRegression keeps them: set
    one and the other is cleared; both set must agree (binary)."""

    def setThreshold(self, value):
        self._set(threshold=value)
        self.clear(self.thresholds)
        return self

    def setThresholds(self, value):
        self._set(thresholds=value)
        self.clear(self.threshold)
        return self

    def getThreshold(self):
        self._checkThresholdConsistency()
        if self.isSet(self.thresholds):
            ts = self.getOrDefault(self.thresholds)
            if len(ts) != 2:
                raise ValueError("Logistic Regression getThreshold only applies to binary "
                                 "classification, but thresholds has length != 2. "
                                 f"thresholds: {ts}")
            return 1.0 / (1.0 + ts[0] / ts[1])
        return self.getOrDefault(self.threshold)

    def getThresholds(self):
        self._checkThresholdConsistency()
        if not self.isSet(self.thresholds) and self.isSet(self.threshold):
            t = self.getOrDefault(self.threshold)
            return [1.0 - t, t]
        return self.getOrDefault(self.thresholds)

    def _checkThresholdConsistency(self):
        if self.isSet(self.threshold) and self.isSet(self.thresholds):
            ts = self.getOrDefault(self.thresholds)
            if len(ts) != 2:
                raise ValueError("Logistic Regression getThreshold only applies to binary "
                                 "classification, but thresholds has length != 2. "
                                 f"thresholds: {ts}")
            t = 1.0 / (1.0 + ts[0] / ts[1])
            t2 = self.getOrDefault(self.threshold)
            if abs(t2 - t) >= 1e-5:
                raise ValueError("Logistic Regression getThreshold found inconsistent values "
                                 f"for threshold ({t2:g}) and thresholds (equivalent to {t:g})")



class _ModelWriter(MLWriter):
    """``model.write().overwrite().save(path)``: the layout of :mod:`sparkgd.persist`
    (DESIGN section 4 plus Spark ML's ``metadata/``), replaced atomically -- not
    deleted first, as ``MLWriter``'s own overwrite does."""

    def __init__(self, instance):
        super().__init__()
        self.instance = instance

    def save(self, path):
        from . import persist

        persist.save_model(self.instance, path, overwrite=self.shouldOverwrite)


class _ModelReader(MLReader):
    def __init__(self, cls):
        super().__init__()
        self.cls = cls

    def load(self, path):
        from . import persist

        return persist.load_model(path, MODEL_CLASSES, expected=self.cls)


class _SparkgdModel(Model, _SparkgdParams, MLWritable, MLReadable):
    def __init__(self):
        super().__init__()
        self._coef = None
        self._intercept = None
        self._loss_name = None
        self._loss_params = {}
        self._num_classes = None
        self._summary = None
        self._est_params = {}

    @classmethod
    def _from_fit(cls, coef, intercept, loss_name, num_classes, summary, loss_params=None):
        m = cls()
        m._coef = np.asarray(coef, dtype=np.float64)  # (K, d) (a fit's own: not copied)
        m._intercept = np.array(intercept, dtype=np.float64)  # (K,)
        m._loss_name = loss_name
        m._loss_params = dict(loss_params or {})
        m._num_classes = num_classes
        m._summary = summary
        return m

    @property
    def coefficients(self):
        """(d,) array, or (K, d) for a multinomial model."""
        return self._coef[0].copy() if self._coef.shape[0] == 1 else self._coef.copy()

    @property
    def intercept(self):
        """float, or (K,) array for a multinomial model."""
        return float(self._intercept[0]) if self._intercept.shape[0] == 1 \
            else self._intercept.copy()

    @property
    def numFeatures(self):
        return int(self._coef.shape[1])

    @property
    def numClasses(self):
        return self._num_classes

    @property
    def lossName(self):
        return self._loss_name

    @property
    def hasSummary(self):
        return self._summary is not None

    @property
    def summary(self):
        if self._summary is None:
            raise RuntimeError("no training summary available for this model")
        return self._summary

    def margins(self, X):
        """Raw margins ``X @ coef.T + intercept`` for a NumPy/SciPy matrix; (n, K)."""
        return kernels.margins(X, self._coef, self._intercept)

    def _margin_column(self, dataset):
        from . import transform

        return transform.margin_column(dataset, self, self._coef, self._intercept)

    def write(self):
        return _ModelWriter(self)

    @classmethod
    def read(cls):
        return _ModelReader(cls)

    def save(self, path, overwrite=False):
        """Save to a local path or any Hadoop-FS URI (:mod:`sparkgd.persist`)."""
        writer = self.write()
        if overwrite:
            writer.overwrite()
        writer.save(path)

    def evaluate(self, dataset):
        """Metrics on ``dataset`` with Spark ML's names (``r2``, ``rootMeanSquaredError``,
        ``areaUnderROC``, ``accuracy``, ...), from one distributed pass."""
        return metrics.evaluate(self, dataset)

    def _vector(self, value):
        """One row's features (a Spark ML vector, list or 1-d array) as a (1, d) matrix."""
        if hasattr(value, "toArray"):
            value = value.toArray()
        x = np.asarray(value, dtype=np.float64)
        if x.ndim != 1 or x.shape[0] != self.numFeatures:
            raise ValueError(f"expected a vector of {self.numFeatures} features, got shape "
                             f"{x.shape}")
        return x[None, :]

    def predictRaw(self, value):
        """Raw prediction of one feature vector (a DenseVector, as Spark ML's)."""
        from pyspark.ml.linalg import Vectors

        z = self.margins(self._vector(value))[0]
        return Vectors.dense(np.array([-z[0], z[0]]) if z.shape[0] == 1 and
                             self._loss_name != "squared" and self._loss_name != "huber"
                             else z)

    def predict(self, value):
        """Prediction of one feature vector (a float), as ``transform`` gives it."""
        z = self.margins(self._vector(value))[0]
        return self._predict_margin(z)

    def _predict_margin(self, z):
        return float(z[0])

    def __repr__(self):
        return (f"{type(self).__name__}(numFeatures={self.numFeatures}, "
                f"loss={self._loss_name!r})")


class LinearRegressionModel(_SparkgdModel):
    def _transform(self, dataset):
        return dataset.withColumn(self.getPredictionCol(), self._margin_column(dataset))


class LogisticRegressionModel(_SparkgdModel, _Thresholds):
    def __init__(self):
        super().__init__()
        self._setDefault(probabilityCol="probability", rawPredictionCol="rawPrediction",
                         threshold=0.5)

    def predictProbability(self, X):
        """Class probabilities: a DenseVector for one feature vector (as Spark ML's), an
        (n, K) array for a NumPy/SciPy matrix."""
        from pyspark.ml.linalg import Vectors

        one = hasattr(X, "toArray") or np.ndim(X) == 1
        z = self.margins(self._vector(X) if one else X)
        if z.shape[1] == 1:
            p1 = kernels._sigmoid(z[:, 0])
            p = np.column_stack([1.0 - p1, p1])
        else:
            e = np.exp(z - z.max(axis=1, keepdims=True))
            p = e / e.sum(axis=1, keepdims=True)
        return Vectors.dense(p[0]) if one else p

    def _predict_margin(self, z):
        if z.shape[0] == 1:
            return float(kernels._sigmoid(z[0]) > self.getThreshold())
        if self.isSet(self.thresholds):
            e = np.exp(z - z.max())
            return float(np.argmax(_scaled(e / e.sum(), self.getThresholds())))
        return float(np.argmax(z))

    def _transform(self, dataset):
        from pyspark.ml.functions import array_to_vector
        from pyspark.sql import functions as F

        out = dataset.withColumn("__sparkgd_margin", self._margin_column(dataset))
        z = F.col("__sparkgd_margin")
        if self._coef.shape[0] == 1:
            p1 = F.lit(1.0) / (F.lit(1.0) + F.exp(-z))
            raw = F.array(-z, z)
            prob = F.array(F.lit(1.0) - p1, p1)
            thr = F.lit(float(self.getThreshold()))
            pred = F.when(p1 > thr, 1.0).when(p1 <= thr, 0.0)     # null margin: null
        else:
            top = F.array_max(z)
            e = F.transform(z, lambda v: F.exp(v - top))
            total = F.aggregate(e, F.lit(0.0), lambda acc, v: acc + v)
            raw = z
            prob = F.transform(e, lambda v: v / total)
            if self.isSet(self.thresholds):
                # Spark ML: argmax of probability / threshold (a zero threshold wins)
                ts = F.array(*[F.lit(float(t)) for t in self.getThresholds()])
                scaled = F.zip_with(prob, ts, lambda p, t: F.when(t > 0, p / t).otherwise(
                    F.when(p > 0, F.lit(float("inf"))).otherwise(0.0)))
                pred = (F.array_position(scaled, F.array_max(scaled)) - 1).cast("double")
            else:
                pred = (F.array_position(z, top) - 1).cast("double")
        # a null margin (a LIBSVM comment line) scores null; array_to_vector cannot take it
        out = out.withColumn(self.getRawPredictionCol(),
                             F.when(z.isNotNull(), array_to_vector(raw)))
        out = out.withColumn(self.getProbabilityCol(),
                             F.when(z.isNotNull(), array_to_vector(prob)))
        out = out.withColumn(self.getPredictionCol(), pred)
        return out.drop("__sparkgd_margin")


class LinearSVCModel(_SparkgdModel, HasRawPredictionCol, HasThreshold):
    def __init__(self):
        super().__init__()
        self._setDefault(rawPredictionCol="rawPrediction", threshold=0.0)

    def _predict_margin(self, z):
        return float(z[0] > self.getThreshold())

    def _transform(self, dataset):
        from pyspark.ml.functions import array_to_vector
        from pyspark.sql import functions as F

        out = dataset.withColumn("__sparkgd_margin", self._margin_column(dataset))
        z = F.col("__sparkgd_margin")
        out = out.withColumn(self.getRawPredictionCol(),
                             F.when(z.isNotNull(), array_to_vector(F.array(-z, z))))
        out = out.withColumn(self.getPredictionCol(),
                             F.when(z > F.lit(float(self.getThreshold())), 1.0)
                             .when(z <= F.lit(float(self.getThreshold())), 0.0))
        return out.drop("__sparkgd_margin")


#: What a fitted model lets you change, as Spark ML's models (``model.setThreshold``).
MODEL_SETTERS = ("featuresCol", "featureCols", "predictionCol", "probabilityCol",
                 "rawPredictionCol", "threshold", "thresholds")


def _add_accessors(cls, names):
    """``set<Name>``/``get<Name>`` for each param in ``names`` that ``cls`` has and does
    not define yet (Spark ML's estimators have one per param)."""
    for name in names:
        if not isinstance(getattr(cls, name, None), Param):
            continue
        cap = name[0].upper() + name[1:]
        if not hasattr(cls, "set" + cap):
            setattr(cls, "set" + cap, _setter(name))
        if not hasattr(cls, "get" + cap):
            setattr(cls, "get" + cap, _getter(name))


def _setter(name):
    def set_(self, value):
        return self._set(**{name: value})
    set_.__name__ = "set" + name[0].upper() + name[1:]
    set_.__doc__ = f"Sets the value of :py:attr:`{name}`."
    return set_


def _getter(name):
    def get(self):
        return self.getOrDefault(name)
    get.__name__ = "get" + name[0].upper() + name[1:]
    get.__doc__ = f"Gets the value of :py:attr:`{name}` or its default value."
    return get


for _cls in (LinearRegressionModel, LogisticRegressionModel, LinearSVCModel):
    _add_accessors(_cls, MODEL_SETTERS)

#: Saved class name -> model class (``load_model`` looks names up here; nothing is eval'd).
MODEL_CLASSES = {cls.__name__: cls for cls in (LinearRegressionModel, LogisticRegressionModel,
                                               LinearSVCModel)}


def load_model(path):
    """Read a model written by ``model.save`` (``sparkgd.load_model``)."""
    from . import persist

    return persist.load_model(path, MODEL_CLASSES)
