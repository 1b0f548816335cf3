"""Spark ML-style estimators: params -> plan -> coordinator -> model.

``Estimator.fit -> _fit`` only orchestrates: check the params and the input's schema,
make the plain :class:`~sparkgd.coordinator.Plan` of the fit, run it where the session
lets it (:func:`sparkgd.launch.fit`: in the driver, or inside the cluster for a Spark
Connect session), and wrap its outcome in a model (:mod:`sparkgd.models`). The params
are :mod:`sparkgd.params`; the fit itself is :mod:`sparkgd.coordinator`.
"""
from __future__ import annotations

import logging
import math
import threading

import numpy as np
from pyspark import keyword_only
from pyspark.ml import Estimator, Model
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import HasRawPredictionCol, HasThreshold
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsWriter, MLWritable

from . import coordinator, data, launch, multi, privacy
from .errors import SparkgdError
from .models import (  # noqa: F401  (the models are sparkgd's public names here too)
    MODEL_CLASSES,
    LinearRegressionModel,
    LinearSVCModel,
    LogisticRegressionModel,
    _add_accessors,
    _SparkgdModel,
    _Thresholds,
    load_model,
)
from .modes import dp
from .params import MODES, _SparkgdParams, validate  # noqa: F401
from .summary import TrainingSummary

log = logging.getLogger("sparkgd")


class _EstimatorWriter(DefaultParamsWriter):
    """Spark ML's own params writer (``Pipeline.save``, ``CrossValidator.save``); an
    ``initialModel`` given as a fitted model has no JSON form: save it and pass its
    path."""

    def saveImpl(self, path):
        if isinstance(self.instance.getInitialModel(), Model):
            raise SparkgdError("cannot save an estimator whose initialModel is a fitted "
                               "model object: save that model and set initialModel to its path")
        super().saveImpl(path)


class _SparkgdEstimator(Estimator, _SparkgdParams, MLWritable, DefaultParamsReadable):
    _model_class = None

    def write(self):
        return _EstimatorWriter(self)

    def _validate(self):
        validate(self)
        dp.check(self)

    def _plan_fields(self):
        """The estimator's own part of the plan (its model and loss)."""
        raise NotImplementedError

    def _plan(self, dataset):
        """The fit's :class:`~sparkgd.coordinator.Plan`: every param checked, the input's
        columns resolved, a warm start read."""
        self._validate()
        source = getattr(self, "_source_name", None) or "the DataFrame"
        weight_col = self.getWeightCol() if self.isSet(self.weightCol) else None
        spec = data.resolve_input(dataset.schema, self.getFeaturesCol(), self.getFeatureCols(),
                                  self.getLabelCol(), weight_col or None, source=source)
        private = dp.check(self)             # the param that enabled DP, or None
        if private and weight_col:
            from pyspark.sql import functions as F

            # the clip bound is per row: a weight above 1 would stand for several rows
            top = dataset.agg(F.max(F.col(weight_col).cast("double"))).first()[0]
            privacy.check_weights(top if top is not None else 0.0, private)
        step = self.getStepSize() if self.isSet(self.stepSize) else None
        dp_plan = None if not private else {
            "epsilon": self.getDpEpsilon(), "delta": self.getDpDelta(),
            "sigma": self.getNoiseMultiplier(), "clip": float(self.getMaxGradNorm())}
        return coordinator.Plan(
            spec=spec, source=source, params=self._param_values(),
            fit_intercept=self.getFitIntercept(), reg_param=float(self.getRegParam()),
            elastic_net_param=float(self.getElasticNetParam()),
            standardization=bool(self.getStandardization()), optimizer=self.getOptimizer(),
            step_size=None if step is None else float(step), max_iter=int(self.getMaxIter()),
            tol=float(self.getTol()), mini_batch_fraction=float(self.getMiniBatchFraction()),
            seed=int(self.getSeed()), mode=self.getMode(), local_steps=int(self.getLocalSteps()),
            staleness=int(self.getStaleness()), topology=self.getTopology(),
            aggregation_depth=int(self.getAggregationDepth()),
            compression=self.getCompression(), dtype=self.getDtype(),
            checkpoint_dir=self.getCheckpointDir(),
            checkpoint_interval=int(self.getCheckpointInterval()),
            resume=bool(self.getResume()), dp=dp_plan, initial=self._initial(),
            label_col=self.getLabelCol(), **self._plan_fields())

    def _initial(self):
        """Warm start: (coef (K, d), intercept (K,)) of a fitted or saved model, or None
        (its shape is checked against the data by the coordinator)."""
        initial = self.getInitialModel()
        if initial is None:
            return None
        if isinstance(initial, str):
            initial = load_model(initial)
        if not isinstance(initial, _SparkgdModel):
            raise SparkgdError(f"initialModel must be a sparkgd model or a saved model's path "
                               f"(got {type(initial).__name__})")
        return (np.array(initial._coef, dtype=np.float64),
                np.array(initial._intercept, dtype=np.float64))

    def _fit(self, dataset):
        plan = self._plan(dataset)
        return self._model_of(launch.fit(dataset, plan), plan, dataset)

    def fitMultiple(self, dataset, paramMaps):
        """Spark ML's ``fitMultiple`` (what pyspark.ml.tuning calls for each fold): an
        iterator of ``(index, model)``, thread-safe. The param maps that read the data the
        same way are fitted together, over one build of the blocks, each pass one read
        of them for every model still running (:mod:`sparkgd.multi`); each model is the
        one its own ``fit`` gives. A Spark Connect session fits them one by one."""
        if len(paramMaps) < 2 or launch.is_connect(dataset.sparkSession):
            return super().fitMultiple(dataset, paramMaps)
        return _SharedFits(self, dataset, paramMaps)

    def _model_of(self, outcome, plan, dataset):
        summary = TrainingSummary(**outcome.summary)
        summary.metrics = outcome.metrics
        model = self._model_class._from_fit(outcome.full_coef(), outcome.intercept,
                                            outcome.loss_name, outcome.num_classes, summary,
                                            outcome.loss_params)
        model._est_params = plan.params
        model = self._copyValues(model)
        if outcome.no_metrics is not None:
            summary._no_metrics = outcome.no_metrics
        elif outcome.metrics is None:
            summary._pending = (model, dataset)   # the metrics: one pass, when first asked
        else:
            summary._scored = (model, dataset)    # ``predictions``, when first asked
        return model


class _SharedFits:
    """fitMultiple's iterator: on the first ``next``, every param map is fitted -- the
    groups of :func:`sparkgd.multi.groups` together, the rest alone -- then the models
    are handed out in order, one a call, from whichever thread asks."""

    def __init__(self, estimator, dataset, param_maps):
        self.estimator, self.dataset = estimator, dataset
        self.param_maps = list(param_maps)
        self.models = None
        self.failed = None
        self.counter = 0
        self.lock = threading.Lock()

    def __iter__(self):
        return self

    def __next__(self):
        with self.lock:
            if self.counter >= len(self.param_maps):
                raise StopIteration("no models remaining")
            if self.failed is not None:
                raise self.failed            # (every caller: not the whole grid again)
            if self.models is None:
                try:
                    self.models = self._fit_all()
                except BaseException as e:
                    self.failed = e
                    raise
            index = self.counter
            self.counter += 1
        return index, self.models[index]

    next = __next__

    def _fit_all(self):
        copies = [self.estimator.copy(pm) for pm in self.param_maps]
        plans = [est._plan(self.dataset) for est in copies]
        models = [None] * len(plans)
        for group in multi.groups(plans):
            if len(group) == 1:
                i = group[0]
                models[i] = copies[i]._model_of(launch.fit(self.dataset, plans[i]),
                                                plans[i], self.dataset)
                continue
            log.info("fitMultiple: %d param maps over one build of the blocks", len(group))
            outcomes = launch.fit_many(self.dataset, [plans[i] for i in group])
            for i, outcome in zip(group, outcomes):
                models[i] = copies[i]._model_of(outcome, plans[i], self.dataset)
        return models


_COMMON_DOC = """
    Shared params (Spark ML names): featuresCol, featureCols, labelCol, weightCol,
    predictionCol, maxIter, tol, regParam, elasticNetParam, fitIntercept,
    standardization (default False), aggregationDepth, optimizer, stepSize,
    miniBatchFraction, seed, initialModel, dtype (float64 or float32 block storage),
    compression (none, fp16, topk:<fraction>, qsgd:<bits>: what serving tasks send),
    topology (tree, star, ring: how they combine a pass), mode (sync, local, async:
    how they update the model), localSteps (local), staleness (async).
"""


class LinearRegression(_SparkgdEstimator):
    """Linear regression, ``loss`` = ``squared`` (``0.5 (y - z)^2``) or ``huber``."""

    __doc__ += _COMMON_DOC

    loss = Param(Params._dummy(), "loss", "loss function: squared or huber",
                 typeConverter=TypeConverters.toString)
    epsilon = Param(Params._dummy(), "epsilon", "huber: where the loss turns linear (> 0)",
                    typeConverter=TypeConverters.toFloat)

    @keyword_only
    def __init__(self, *, featuresCol="features", labelCol="label", predictionCol="prediction",
                 weightCol=None, featureCols=None, maxIter=100, tol=1e-6, regParam=0.0,
                 elasticNetParam=0.0, fitIntercept=True, standardization=False,
                 aggregationDepth=2, optimizer="lbfgs", stepSize=None, miniBatchFraction=1.0,
                 seed=0, initialModel=None, dtype="float64",
                 compression="none", topology="tree", mode="sync",
                 localSteps=10, staleness=2, checkpointDir=None, checkpointInterval=10,
                 resume=False, dpEpsilon=None, dpDelta=None, maxGradNorm=1.0,
                 noiseMultiplier=None, loss="squared", epsilon=1.35):
        super().__init__()
        self._setDefault(loss="squared", epsilon=1.35)
        self.setParams(**self._input_kwargs)

    @keyword_only
    def setParams(self, *, featuresCol="features", labelCol="label", predictionCol="prediction",
                  weightCol=None, featureCols=None, maxIter=100, tol=1e-6, regParam=0.0,
                  elasticNetParam=0.0, fitIntercept=True, standardization=False,
                  aggregationDepth=2, optimizer="lbfgs", stepSize=None, miniBatchFraction=1.0,
                  seed=0, initialModel=None, dtype="float64",
                  compression="none", topology="tree", mode="sync",
                  localSteps=10, staleness=2, checkpointDir=None, checkpointInterval=10,
                  resume=False, dpEpsilon=None, dpDelta=None, maxGradNorm=1.0,
                  noiseMultiplier=None, loss="squared", epsilon=1.35):
        kwargs = {k: v for k, v in self._input_kwargs.items() if v is not None}
        return self._set(**kwargs)

    def _validate(self):
        super()._validate()
        name = self.getOrDefault(self.loss)
        if name not in ("squared", "huber"):
            raise SparkgdError(f"unknown loss '{name}' for LinearRegression; "
                               "expected squared or huber")
        eps = self.getOrDefault(self.epsilon)
        if name == "huber" and not 0 < eps < math.inf:
            raise SparkgdError(f"epsilon must be a finite number > 0 (got {eps})")

    def _plan_fields(self):
        return dict(model="regression", loss=self.getOrDefault(self.loss),
                    epsilon=float(self.getOrDefault(self.epsilon)))


class LogisticRegression(_SparkgdEstimator, _Thresholds):
    """Logistic regression: binomial (``log(1 + e^z) - y z``) or multinomial (softmax).

    ``family``: ``auto`` (binomial for labels {0, 1}, else multinomial),
    ``binomial`` or ``multinomial``.
    """

    __doc__ += _COMMON_DOC

    family = Param(Params._dummy(), "family", "auto, binomial or multinomial",
                   typeConverter=TypeConverters.toString)

    @keyword_only
    def __init__(self, *, featuresCol="features", labelCol="label", predictionCol="prediction",
                 probabilityCol="probability", rawPredictionCol="rawPrediction",
                 weightCol=None, featureCols=None, maxIter=100, tol=1e-6, regParam=0.0,
                 elasticNetParam=0.0, fitIntercept=True, standardization=False,
                 aggregationDepth=2, optimizer="lbfgs", stepSize=None, miniBatchFraction=1.0,
                 seed=0, initialModel=None, dtype="float64",
                 compression="none", topology="tree", mode="sync",
                 localSteps=10, staleness=2, checkpointDir=None, checkpointInterval=10,
                 resume=False, dpEpsilon=None, dpDelta=None, maxGradNorm=1.0,
                 noiseMultiplier=None, threshold=0.5, thresholds=None, family="auto"):
        super().__init__()
        self._setDefault(probabilityCol="probability", rawPredictionCol="rawPrediction",
                         threshold=0.5, family="auto")
        self.setParams(**self._input_kwargs)
        self._checkThresholdConsistency()

    @keyword_only
    def setParams(self, *, featuresCol="features", labelCol="label", predictionCol="prediction",
                  probabilityCol="probability", rawPredictionCol="rawPrediction",
                  weightCol=None, featureCols=None, maxIter=100, tol=1e-6, regParam=0.0,
                  elasticNetParam=0.0, fitIntercept=True, standardization=False,
                  aggregationDepth=2, optimizer="lbfgs", stepSize=None, miniBatchFraction=1.0,
                  seed=0, initialModel=None, dtype="float64",
                  compression="none", topology="tree", mode="sync",
                  localSteps=10, staleness=2, checkpointDir=None, checkpointInterval=10,
                  resume=False, dpEpsilon=None, dpDelta=None, maxGradNorm=1.0,
                  noiseMultiplier=None, threshold=0.5, thresholds=None, family="auto"):
        kwargs = {k: v for k, v in self._input_kwargs.items() if v is not None}
        return self._set(**kwargs)

    def getFamily(self):
        return self.getOrDefault(self.family)

    def _validate(self):
        super()._validate()
        if self.getFamily() not in ("auto", "binomial", "multinomial"):
            raise SparkgdError(f"unknown family '{self.getFamily()}'; expected auto, binomial "
                               "or multinomial")

    def _plan_fields(self):
        thresholds = self.getOrDefault(self.thresholds) if self.isSet(self.thresholds) \
            else None
        return dict(model="logistic", family=self.getFamily(),
                    threshold=float(self.getThreshold()) if thresholds is None or
                    len(thresholds) == 2 else None,
                    thresholds=None if thresholds is None else [float(t) for t in thresholds])


class LinearSVC(_SparkgdEstimator, HasRawPredictionCol, HasThreshold):
    """Linear SVM: ``loss(y, z) = max(0, 1 - (2y - 1) z)``, y in {0, 1}."""

    __doc__ += _COMMON_DOC

    @keyword_only
    def __init__(self, *, featuresCol="features", labelCol="label", predictionCol="prediction",
                 rawPredictionCol="rawPrediction", weightCol=None, featureCols=None,
                 maxIter=100, tol=1e-6, regParam=0.0, elasticNetParam=0.0, fitIntercept=True,
                 standardization=False, aggregationDepth=2, optimizer="lbfgs", stepSize=None,
                 miniBatchFraction=1.0, seed=0, initialModel=None, dtype="float64",
                 compression="none", topology="tree", mode="sync",
                 localSteps=10, staleness=2, checkpointDir=None, checkpointInterval=10,
                 resume=False, dpEpsilon=None, dpDelta=None, maxGradNorm=1.0,
                 noiseMultiplier=None, threshold=0.0):
        super().__init__()
        self._setDefault(rawPredictionCol="rawPrediction", threshold=0.0)
        self.setParams(**self._input_kwargs)

    @keyword_only
    def setParams(self, *, featuresCol="features", labelCol="label", predictionCol="prediction",
                  rawPredictionCol="rawPrediction", weightCol=None, featureCols=None,
                  maxIter=100, tol=1e-6, regParam=0.0, elasticNetParam=0.0, fitIntercept=True,
                  standardization=False, aggregationDepth=2, optimizer="lbfgs", stepSize=None,
                  miniBatchFraction=1.0, seed=0, initialModel=None, dtype="float64",
                  compression="none", topology="tree", mode="sync",
                  localSteps=10, staleness=2, checkpointDir=None, checkpointInterval=10,
                  resume=False, dpEpsilon=None, dpDelta=None, maxGradNorm=1.0,
                  noiseMultiplier=None, threshold=0.0):
        kwargs = {k: v for k, v in self._input_kwargs.items() if v is not None}
        return self._set(**kwargs)

    def _plan_fields(self):
        return dict(model="svc", threshold=float(self.getOrDefault(self.threshold)))


LinearRegression._model_class = LinearRegressionModel
LogisticRegression._model_class = LogisticRegressionModel
LinearSVC._model_class = LinearSVCModel


for _cls in (LinearRegression, LogisticRegression, LinearSVC):
    _add_accessors(_cls, [p.name for p in _cls().params])
