"""Spark ML-style estimators and models.

``Estimator.fit -> _fit`` only orchestrates: check the input, build the cached
blocks, run the training loop, wrap the result in a model. The params use
Spark ML's names (and mixins) so the estimators sit in a ``Pipeline``.
"""
from __future__ import annotations

import numpy as np
from pyspark import keyword_only
from pyspark.ml import Estimator, Model
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import (
    HasAggregationDepth,
    HasFeaturesCol,
    HasFitIntercept,
    HasLabelCol,
    HasMaxIter,
    HasPredictionCol,
    HasProbabilityCol,
    HasRawPredictionCol,
    HasRegParam,
    HasStepSize,
    HasThreshold,
    HasTol,
    HasWeightCol,
)

from . import data, kernels, optim, stats
from .comm import Aggregator
from .errors import SparkgdError
from .modes import sync
from .summary import TrainingSummary

# ----------------------------------------------------------------------------
# Params
# ----------------------------------------------------------------------------


class _SparkgdParams(HasFeaturesCol, HasLabelCol, HasWeightCol, HasPredictionCol, HasMaxIter,
                     HasTol, HasRegParam, HasFitIntercept, HasAggregationDepth, HasStepSize):
    """Params every sparkgd estimator and model shares."""

    featureCols = Param(
        Params._dummy(), "featureCols",
        "numeric columns to use as features instead of featuresCol (optional)",
        typeConverter=TypeConverters.toListString)
    optimizer = Param(
        Params._dummy(), "optimizer",
        "optimizer: " + ", ".join(optim.OPTIMIZERS) + " (gd uses a fixed step when "
        "stepSize is set, else backtracking)", typeConverter=TypeConverters.toString)

    def __init__(self, *args):
        super().__init__(*args)
        self._setDefault(featuresCol="features", labelCol="label", predictionCol="prediction",
                         maxIter=100, tol=1e-6, regParam=0.0, fitIntercept=True,
                         aggregationDepth=2, optimizer="lbfgs")

    def getFeatureCols(self):
        return self.getOrDefault(self.featureCols) if self.isDefined(self.featureCols) else None

    def getOptimizer(self):
        return self.getOrDefault(self.optimizer)

    def _param_values(self):
        """Every param with a value (set or default), as plain JSON-able values."""
        out = {}
        for p in self.params:
            if self.isDefined(p):
                v = self.getOrDefault(p)
                out[p.name] = v.tolist() if isinstance(v, np.ndarray) else v
        return out


def _validate_common(est):
    if est.getMaxIter() < 0:
        raise SparkgdError(f"maxIter must be >= 0 (got {est.getMaxIter()})")
    if est.getTol() < 0:
        raise SparkgdError(f"tol must be >= 0 (got {est.getTol()})")
    if est.getRegParam() < 0:
        raise SparkgdError(f"regParam must be >= 0 (got {est.getRegParam()})")
    if est.getAggregationDepth() < 2:
        raise SparkgdError(f"aggregationDepth must be >= 2 (got {est.getAggregationDepth()})")
    if est.getOptimizer() not in optim.OPTIMIZERS:
        raise SparkgdError(f"unknown optimizer '{est.getOptimizer()}'; expected one of "
                           + ", ".join(optim.OPTIMIZERS))
    if est.isSet(est.stepSize) and not est.getStepSize() > 0:
        raise SparkgdError(f"stepSize must be > 0 (got {est.getStepSize()})")


# ----------------------------------------------------------------------------
# Estimators
# ----------------------------------------------------------------------------


class _SparkgdEstimator(Estimator, _SparkgdParams):
    _model_class = None

    def _loss_name(self):
        raise NotImplementedError

    def _num_classes(self, blocks):
        return None

    def _check_labels(self, blocks, loss_name):
        lo, hi, integral = blocks.label_range()
        label = self.getLabelCol()
        if kernels.LOSSES[loss_name].labels == "binary" and (lo < 0 or hi > 1 or not integral):
            bad = lo if (lo < 0 or lo not in (0.0, 1.0)) else hi
            raise SparkgdError(
                f"label column '{label}' holds {bad:g}; the {loss_name} loss needs labels 0 or 1")

    def _fit(self, dataset):
        _validate_common(self)
        source = getattr(self, "_source_name", None) or "the DataFrame"
        spec = data.resolve_input(dataset.schema, self.getFeaturesCol(), self.getFeatureCols(),
                                  self.getLabelCol(),
                                  self.getWeightCol() if self.isSet(self.weightCol)
                                  and self.getWeightCol() else None, source=source)
        loss_name = self._loss_name()
        loss = kernels.make_loss(loss_name)
        with data.build_blocks(dataset, spec, source=source) as blocks:
            self._check_labels(blocks, loss_name)
            num_classes = self._num_classes(blocks)
            layout = kernels.Layout(blocks.num_features, loss.n_outputs(num_classes),
                                    self.getFitIntercept())
            aggregator = Aggregator("tree", self.getAggregationDepth())
            objective = sync.DistributedObjective(
                blocks, loss, layout, reg_param=self.getRegParam(), aggregator=aggregator)
            step = self.getStepSize() if self.isSet(self.stepSize) else None
            pre = None
            if self.getOptimizer() == "lbfgs" or (self.getOptimizer() == "gd" and step is None):
                # Line-search methods run where features look standardized (same objective).
                mean, std = stats.feature_moments(blocks.rdd, layout.d, aggregator)
                pre = stats.Preconditioner(mean, std, layout)
            result = sync.fit(objective, layout.zeros(), optimizer=self.getOptimizer(),
                              max_iter=self.getMaxIter(), tol=self.getTol(), step_size=step,
                              precondition=pre)
        coef, intercept = layout.split(result.theta)
        summary = TrainingSummary(
            objectiveHistory=result.objective_history, totalIterations=result.iterations,
            trainingSeconds=result.seconds, bytesCommunicated=result.bytes_communicated,
            numEvaluations=result.evaluations, converged=result.converged,
            message=result.message, numRows=blocks.num_rows,
            numPartitions=blocks.num_partitions)
        model = self._model_class._from_fit(coef, intercept, layout, loss_name, num_classes,
                                            summary)
        model._est_params = self._param_values()
        return self._copyValues(model)


class LinearRegression(_SparkgdEstimator):
    """Least squares: ``loss(y, z) = 0.5 (y - z)^2`` plus the elastic-net penalty."""

    loss = Param(Params._dummy(), "loss", "loss function: squared",
                 typeConverter=TypeConverters.toString)

    @keyword_only
    def __init__(self, *, featuresCol="features", labelCol="label", predictionCol="prediction",
                 weightCol=None, featureCols=None, maxIter=100, tol=1e-6, regParam=0.0,
                 fitIntercept=True, aggregationDepth=2, optimizer="lbfgs", stepSize=None,
                 loss="squared"):
        super().__init__()
        self._setDefault(loss="squared")
        self.setParams(**self._input_kwargs)

    @keyword_only
    def setParams(self, *, featuresCol="features", labelCol="label", predictionCol="prediction",
                  weightCol=None, featureCols=None, maxIter=100, tol=1e-6, regParam=0.0,
                  fitIntercept=True, aggregationDepth=2, optimizer="lbfgs", stepSize=None,
                  loss="squared"):
        kwargs = {k: v for k, v in self._input_kwargs.items() if v is not None}
        return self._set(**kwargs)

    def _loss_name(self):
        name = self.getOrDefault(self.loss)
        if name != "squared":
            raise SparkgdError(f"unknown loss '{name}' for LinearRegression; expected squared")
        return name


class LogisticRegression(_SparkgdEstimator, HasProbabilityCol, HasRawPredictionCol,
                         HasThreshold):
    """Binary logistic regression: ``loss(y, z) = log(1 + e^z) - y z``, y in {0, 1}."""

    @keyword_only
    def __init__(self, *, featuresCol="features", labelCol="label", predictionCol="prediction",
                 probabilityCol="probability", rawPredictionCol="rawPrediction",
                 weightCol=None, featureCols=None, maxIter=100, tol=1e-6, regParam=0.0,
                 fitIntercept=True, aggregationDepth=2, optimizer="lbfgs", stepSize=None,
                 threshold=0.5):
        super().__init__()
        self._setDefault(probabilityCol="probability", rawPredictionCol="rawPrediction",
                         threshold=0.5)
        self.setParams(**self._input_kwargs)

    @keyword_only
    def setParams(self, *, featuresCol="features", labelCol="label", predictionCol="prediction",
                  probabilityCol="probability", rawPredictionCol="rawPrediction",
                  weightCol=None, featureCols=None, maxIter=100, tol=1e-6, regParam=0.0,
                  fitIntercept=True, aggregationDepth=2, optimizer="lbfgs", stepSize=None,
                  threshold=0.5):
        kwargs = {k: v for k, v in self._input_kwargs.items() if v is not None}
        return self._set(**kwargs)

    def _loss_name(self):
        return "logistic"

    def _num_classes(self, blocks):
        return 2


# ----------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------


class _SparkgdModel(Model, _SparkgdParams):
    _estimator_class = None

    def __init__(self):
        super().__init__()
        self._coef = None
        self._intercept = None
        self._loss_name = None
        self._num_classes = None
        self._summary = None
        self._est_params = {}

    @classmethod
    def _from_fit(cls, coef, intercept, layout, loss_name, num_classes, summary):
        m = cls()
        m._coef = np.array(coef, dtype=np.float64)  # (K, d)
        m._intercept = np.array(intercept, dtype=np.float64)  # (K,)
        m._loss_name = loss_name
        m._num_classes = num_classes
        m._summary = summary
        m._est_params = {}
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
    def loss(self):
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

    def save(self, path, overwrite=False):
        from . import persist

        persist.save_model(self, path, overwrite=overwrite)

    def __repr__(self):
        return (f"{type(self).__name__}(numFeatures={self.numFeatures}, "
                f"loss={self._loss_name!r})")


class LinearRegressionModel(_SparkgdModel):
    _estimator_class = LinearRegression

    def _transform(self, dataset):
        z = self._margin_column(dataset)
        return dataset.withColumn(self.getPredictionCol(), z)


class LogisticRegressionModel(_SparkgdModel, HasProbabilityCol, HasRawPredictionCol,
                              HasThreshold):
    _estimator_class = LogisticRegression

    def __init__(self):
        super().__init__()
        self._setDefault(probabilityCol="probability", rawPredictionCol="rawPrediction",
                         threshold=0.5)

    def predictProbability(self, X):
        """Class probabilities for a NumPy/SciPy matrix, (n, K)."""
        z = self.margins(X)[:, 0]
        p1 = kernels._sigmoid(z)
        return np.column_stack([1.0 - p1, p1])

    def _transform(self, dataset):
        from pyspark.ml.functions import array_to_vector
        from pyspark.sql import functions as F

        m = self._margin_column(dataset)
        out = dataset.withColumn("__sparkgd_margin", m)
        z = F.col("__sparkgd_margin")
        p1 = F.lit(1.0) / (F.lit(1.0) + F.exp(-z))
        out = out.withColumn(self.getRawPredictionCol(), array_to_vector(F.array(-z, z)))
        out = out.withColumn(self.getProbabilityCol(),
                             array_to_vector(F.array(F.lit(1.0) - p1, p1)))
        out = out.withColumn(self.getPredictionCol(),
                             F.when(p1 > F.lit(float(self.getThreshold())), 1.0).otherwise(0.0))
        return out.drop("__sparkgd_margin")


LinearRegression._model_class = LinearRegressionModel
LogisticRegression._model_class = LogisticRegressionModel

#: Saved class name -> model class (``load_model`` looks names up here; nothing is eval'd).
MODEL_CLASSES = {cls.__name__: cls for cls in (LinearRegressionModel, LogisticRegressionModel)}
