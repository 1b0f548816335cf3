"""Spark ML-style estimators and models.

``Estimator.fit -> _fit`` only orchestrates: check the input, build the cached
blocks, choose the space the optimizer steps in, run the training loop, wrap the
result in a model. The params use Spark ML's names (and mixins) so the
estimators sit in a ``Pipeline``.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import numpy as np
from pyspark import keyword_only
from pyspark.ml import Estimator, Model
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.util import (
    DefaultParamsReadable,
    DefaultParamsWriter,
    MLReadable,
    MLReader,
    MLWritable,
    MLWriter,
)
from pyspark.ml.param.shared import (
    HasAggregationDepth,
    HasCheckpointInterval,
    HasElasticNetParam,
    HasFeaturesCol,
    HasFitIntercept,
    HasLabelCol,
    HasMaxIter,
    HasPredictionCol,
    HasProbabilityCol,
    HasRawPredictionCol,
    HasRegParam,
    HasSeed,
    HasStandardization,
    HasStepSize,
    HasThreshold,
    HasThresholds,
    HasTol,
    HasWeightCol,
)

from . import checkpoint, codecs, data, engine, kernels, metrics, optim, privacy, stats
from .comm import TOPOLOGIES
from .errors import SparkgdError
from .modes import dp, local, ps, sync
from .penalties import Penalty
from .summary import TrainingSummary

log = logging.getLogger("sparkgd")

#: How the tasks update the model (the ``mode`` param).
MODES = ("sync", "local", "async")

# ----------------------------------------------------------------------------
# Params
# ----------------------------------------------------------------------------


class _SparkgdParams(HasFeaturesCol, HasLabelCol, HasWeightCol, HasPredictionCol, HasMaxIter,
                     HasTol, HasRegParam, HasElasticNetParam, HasFitIntercept,
                     HasStandardization, HasAggregationDepth, HasStepSize, HasSeed,
                     HasCheckpointInterval):
    """Params every sparkgd estimator and model shares."""

    featureCols = Param(
        Params._dummy(), "featureCols",
        "numeric columns to use as features instead of featuresCol (optional)",
        typeConverter=TypeConverters.toListString)
    optimizer = Param(
        Params._dummy(), "optimizer",
        "optimizer: " + ", ".join(optim.OPTIMIZERS) + " (gd uses a fixed step when "
        "stepSize is set, else backtracking)", typeConverter=TypeConverters.toString)
    miniBatchFraction = Param(
        Params._dummy(), "miniBatchFraction",
        "fraction of the rows sampled afresh each iteration by sgd, in (0, 1]",
        typeConverter=TypeConverters.toFloat)
    initialModel = Param(
        Params._dummy(), "initialModel",
        "warm start: a fitted sparkgd model, or the path of a saved one")
    dtype = Param(
        Params._dummy(), "dtype",
        "how the cached blocks store dense features: float64, or float32 (half the "
        "memory and bytes read per pass; sums stay float64)",
        typeConverter=TypeConverters.toString)
    compression = Param(
        Params._dummy(), "compression",
        "how serving tasks encode the partial gradients they send: none, fp16, "
        "topk:<fraction> (with error feedback) or qsgd:<bits>; lossy ones need a "
        "first-order optimizer", typeConverter=TypeConverters.toString)
    mode = Param(
        Params._dummy(), "mode",
        "how the tasks update the model: sync (bulk-synchronous), local (local SGD: "
        "localSteps steps on each task's own rows, then the models are averaged) or "
        "async (a parameter server on the driver applies each task's push as it arrives; "
        "tasks at most staleness clocks apart)", typeConverter=TypeConverters.toString)
    localSteps = Param(
        Params._dummy(), "localSteps",
        "mode local: optimizer steps each task takes between two averagings (>= 1)",
        typeConverter=TypeConverters.toInt)
    staleness = Param(
        Params._dummy(), "staleness",
        "mode async: how many clocks a task may run ahead of the slowest (>= 0; 0 is "
        "bulk-synchronous and gives sync's result)", typeConverter=TypeConverters.toInt)
    checkpointDir = Param(
        Params._dummy(), "checkpointDir",
        "where the driver saves the fit's state every checkpointInterval iterations (a "
        "local directory; none: no checkpoints)", typeConverter=TypeConverters.toString)
    resume = Param(
        Params._dummy(), "resume",
        "go on from the checkpoint in checkpointDir (refused if it was written for other "
        "data or params; a fresh start when there is none)",
        typeConverter=TypeConverters.toBoolean)
    dpEpsilon = Param(
        Params._dummy(), "dpEpsilon",
        "differential privacy (DP-SGD): the target epsilon of the whole fit; enables DP "
        "(the noise is calibrated to it; give this or noiseMultiplier)",
        typeConverter=TypeConverters.toFloat)
    dpDelta = Param(
        Params._dummy(), "dpDelta",
        "DP-SGD: delta (default 1/(10 n) rounded down to one significant digit)",
        typeConverter=TypeConverters.toFloat)
    maxGradNorm = Param(
        Params._dummy(), "maxGradNorm",
        "DP-SGD: each row's gradient is clipped to this L2 norm C (default 1.0)",
        typeConverter=TypeConverters.toFloat)
    noiseMultiplier = Param(
        Params._dummy(), "noiseMultiplier",
        "DP-SGD: the noise's standard deviation over C, instead of dpEpsilon (the "
        "summary then reports the epsilon it spent)", typeConverter=TypeConverters.toFloat)
    topology = Param(
        Params._dummy(), "topology",
        "how serving tasks combine a pass: tree (default; fan-in from aggregationDepth, "
        "as treeAggregate), star (every task to the driver) or ring (reduce-scatter "
        "among the tasks)", typeConverter=TypeConverters.toString)

    def __init__(self, *args):
        super().__init__(*args)
        self._setDefault(featuresCol="features", labelCol="label", predictionCol="prediction",
                         maxIter=100, tol=1e-6, regParam=0.0, elasticNetParam=0.0,
                         fitIntercept=True, standardization=False, aggregationDepth=2,
                         optimizer="lbfgs", miniBatchFraction=1.0, seed=0, dtype="float64",
                         compression="none", topology="tree", mode="sync", localSteps=10,
                         staleness=2, checkpointInterval=10, resume=False,
                         dpEpsilon=None, dpDelta=None, maxGradNorm=1.0, noiseMultiplier=None)

    def getFeatureCols(self):
        return self.getOrDefault(self.featureCols) if self.isDefined(self.featureCols) else None

    def getOptimizer(self):
        return self.getOrDefault(self.optimizer)

    def getMiniBatchFraction(self):
        return self.getOrDefault(self.miniBatchFraction)

    def getDtype(self):
        return self.getOrDefault(self.dtype)

    def getCompression(self):
        return self.getOrDefault(self.compression)

    def getTopology(self):
        return self.getOrDefault(self.topology)

    def getCheckpointDir(self):
        return self.getOrDefault(self.checkpointDir) if self.isDefined(self.checkpointDir) \
            else None

    def getResume(self):
        return self.getOrDefault(self.resume)

    def getMode(self):
        return self.getOrDefault(self.mode)

    def getLocalSteps(self):
        return self.getOrDefault(self.localSteps)

    def getStaleness(self):
        return self.getOrDefault(self.staleness)

    def getInitialModel(self):
        return self.getOrDefault(self.initialModel) if self.isDefined(self.initialModel) \
            else None

    def _param_values(self):
        """Every param with a value (set or default), as plain JSON-able values."""
        out = {}
        for p in self.params:
            if self.isDefined(p):
                v = self.getOrDefault(p)
                if isinstance(v, np.ndarray):
                    v = v.tolist()
                elif isinstance(v, Model):
                    v = "<fitted model>"
                out[p.name] = v
        return out


def _validate_common(est):
    """Every shared param's range: the one place it is checked (the command line calls
    this before Spark starts, naming its flags instead)."""
    def fail(msg):
        raise SparkgdError(msg)

    def number(name, value, low, high=math.inf, low_open=False, high_open=True):
        if not math.isfinite(value):
            fail(f"{name} must be a finite number (got {value})")
        if (value <= low if low_open else value < low) or \
                (value >= high if high_open else value > high):
            if high == math.inf:
                where = f"> {low:g}" if low_open else f">= {low:g}"
            else:
                where = f"in {'(' if low_open else '['}{low:g}, {high:g}" \
                    f"{')' if high_open else ']'}"
            fail(f"{name} must be {where} (got {value})")

    if est.getMaxIter() < 0:
        fail(f"maxIter must be >= 0 (got {est.getMaxIter()})")
    number("tol", est.getTol(), 0)
    number("regParam", est.getRegParam(), 0)
    number("elasticNetParam", est.getElasticNetParam(), 0, 1, high_open=False)
    if est.getAggregationDepth() < 2:
        fail(f"aggregationDepth must be >= 2 (got {est.getAggregationDepth()})")
    if est.getDtype() not in data.DTYPES:
        fail(f"unknown dtype '{est.getDtype()}'; expected " + " or ".join(data.DTYPES))
    if est.getOptimizer() not in optim.OPTIMIZERS:
        fail(f"unknown optimizer '{est.getOptimizer()}'; expected one of "
             + ", ".join(optim.OPTIMIZERS))
    if est.getTopology() not in TOPOLOGIES:
        fail(f"unknown topology '{est.getTopology()}'; expected one of "
             + ", ".join(TOPOLOGIES))
    try:
        codec = codecs.parse(est.getCompression())
    except ValueError as e:
        fail(str(e))
    if codec.lossy and est.getOptimizer() == "lbfgs":
        fail(f"compression {est.getCompression()} is lossy and lbfgs needs exact gradients "
             "(its curvature pairs and line search); use optimizer gd, sgd, momentum, "
             "nesterov or adam, or compression none")
    mode = est.getMode()
    if mode not in MODES:
        fail(f"unknown mode '{mode}'; expected one of " + ", ".join(MODES))
    interval = est.getCheckpointInterval()
    if interval == 0 or interval < -1:
        fail(f"checkpointInterval must be >= 1, or -1 for no checkpoints (got {interval})")
    if est.getResume() and not est.getCheckpointDir():
        fail("resume needs checkpointDir: the directory to resume from")
    if est.getLocalSteps() < 1:
        fail(f"localSteps must be >= 1 (got {est.getLocalSteps()})")
    if est.getStaleness() < 0:
        fail(f"staleness must be >= 0 (got {est.getStaleness()})")
    if mode == "local" and est.getOptimizer() not in optim.STOCHASTIC:
        fail(f"mode local takes steps of a first-order optimizer on each task "
             f"({', '.join(optim.STOCHASTIC)}), not {est.getOptimizer()}")
    if mode == "async" and est.getOptimizer() != "sgd":
        fail(f"mode async applies each push as an sgd step on the driver (so that staleness "
             f"0 is sync sgd); optimizer {est.getOptimizer()} needs mode sync or local")
    if est.isSet(est.stepSize):
        number("stepSize", est.getStepSize(), 0, low_open=True)
    number("miniBatchFraction", est.getMiniBatchFraction(), 0, 1, low_open=True,
           high_open=False)
    if est.getMiniBatchFraction() < 1 and est.getOptimizer() not in optim.STOCHASTIC:
        fail(f"miniBatchFraction < 1 needs a stochastic optimizer ({', '.join(optim.STOCHASTIC)}),"
             f" not {est.getOptimizer()}")


def _initial_theta(initial, layout, num_classes, loss_name):
    """Warm start: the flat parameter vector of a fitted or saved model."""
    if initial is None:
        return layout.zeros()
    if isinstance(initial, str):
        initial = load_model(initial)
    if not isinstance(initial, _SparkgdModel):
        raise SparkgdError(f"initialModel must be a sparkgd model or a saved model's path "
                           f"(got {type(initial).__name__})")
    coef, icpt = initial._coef, initial._intercept
    if coef.shape[1] != layout.d:
        raise SparkgdError(f"initialModel has {coef.shape[1]} features but the data has "
                           f"{layout.d}")
    if coef.shape[0] != layout.k:
        raise SparkgdError(f"initialModel has {coef.shape[0]} coefficient row(s) but this fit "
                           f"needs {layout.k} ({loss_name} loss, {num_classes} classes)")
    return layout.join(coef, icpt)


@dataclass
class _Trained:
    """What one training run gives the model."""

    result: sync.FitResult
    layout: kernels.Layout
    loss_name: str
    loss: kernels.Loss
    num_classes: int | None
    facts: object
    dropped: int
    skews: list
    rows_per_task: list
    rejected_pushes: int
    checkpoint: object = None
    privacy: dict = None


# ----------------------------------------------------------------------------
# Estimators
# ----------------------------------------------------------------------------


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

    def _loss(self, num_classes):
        """-> (loss name, loss object), once the number of classes is known."""
        raise NotImplementedError

    def _num_classes(self, facts):
        return None

    def _validate(self):
        _validate_common(self)
        dp.check(self)

    def _check_labels(self, facts, loss_name):
        lo, hi, integral = facts.label_range()
        label = self.getLabelCol()
        kind = kernels.LOSSES[loss_name].labels
        if kind == "binary" and (lo < 0 or hi > 1 or not integral):
            if lo < 0 or hi > 1:
                what = f"{lo:g}" if lo < 0 else f"{hi:g}"
            elif lo not in (0.0, 1.0) or hi not in (0.0, 1.0):
                what = f"{lo:g}" if lo not in (0.0, 1.0) else f"{hi:g}"
            else:
                what = "values other than 0 and 1"
            raise SparkgdError(
                f"label column '{label}' holds {what}; the {loss_name} loss needs labels 0 or 1")
        if kind == "class" and (lo < 0 or not integral):
            raise SparkgdError(
                f"label column '{label}' holds values that are not class indices 0, 1, 2, ... "
                f"(range {lo:g} to {hi:g}); the {loss_name} loss needs them")

    def _fit(self, dataset):
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
        optim.preload(self.getOptimizer())   # overlaps the block build
        self._checkpoint_started = False     # a restarted attempt resumes its own
        self._recovery = checkpoint.Recovery()   # ... and goes on where the lost one was
        topology = self.getTopology()
        if self.getMode() == "async" and topology != "star":
            log.info("mode async: tasks push to the server on the driver (topology "
                     "star; %s applies to modes sync and local)", topology)
            topology = "star"
        fit = engine.run(dataset, spec, self._train, source=source, dtype=self.getDtype(),
                         aggregation_depth=self.getAggregationDepth(), topology=topology)
        coef, intercept = fit.layout.split(fit.result.theta)
        coef, intercept = self._identify(coef.copy(), intercept.copy())
        result, facts = fit.result, fit.facts
        summary = TrainingSummary(
            objectiveHistory=result.objective_history, totalIterations=result.iterations,
            trainingSeconds=result.seconds, bytesCommunicated=result.bytes_communicated,
            driverBytes=result.driver_bytes,
            numEvaluations=result.evaluations, converged=result.converged,
            message=result.message, numRows=facts.num_rows,
            numPartitions=facts.num_partitions, droppedConnections=fit.dropped,
            objectiveTimes=list(result.objective_times or []),
            mode=self.getMode(), taskTimeSkew=[round(v, 3) for v in fit.skews],
            rowsPerTask=fit.rows_per_task, rejectedPushes=fit.rejected_pushes,
            bytesHistory=list(result.bytes_history or []), privacy=fit.privacy)
        model = self._model_class._from_fit(coef, intercept, fit.loss_name, fit.num_classes,
                                            summary, fit.loss.params())
        if fit.checkpoint is not None:
            fit.checkpoint.remove()          # the fit ended well: nothing to resume
        model._est_params = self._param_values()
        model = self._copyValues(model)
        if fit.privacy is None:
            summary._pending = (model, dataset)  # the metrics: one pass, when first asked
        else:     # exact training metrics would leave with the private model: none
            summary._no_metrics = ("a private fit computes no training metrics (they are "
                                   "not noised); use model.evaluate(held_out_df)")
        return model

    def _train(self, engine):
        """One fit over ``engine``'s blocks: the loss (once the labels are known), the
        starting point, the space the optimizer steps in, the training loop."""
        optimizer = self.getOptimizer()
        step = self.getStepSize() if self.isSet(self.stepSize) else None
        standardize = self.getStandardization()
        facts = engine.facts
        num_classes = self._num_classes(facts)
        loss_name, loss = self._loss(num_classes)
        self._check_labels(facts, loss_name)
        layout = kernels.Layout(facts.num_features, loss.n_outputs(num_classes),
                                self.getFitIntercept())
        ck, resumed = self._checkpointer(facts)
        if not self._recovery.vouch(facts):
            log.warning("the blocks built again hold other data than the lost ones "
                        "(%s): the fit starts over", checkpoint.fingerprint(facts))
        line_search = optimizer == "lbfgs" or (optimizer == "gd" and step is None)
        private = dp.check(self) is not None
        mean = std = pre = None
        # the optimizer's space (start, moments) is part of its state: a fit that goes on
        # (a lost task, a lost driver) takes the one it started with, to the bit, whatever
        # grouping of the rows the moments are summed in now
        space = self._recovery.space or (ck.space() if resumed else None)
        if space is not None:
            x0, mean, std = space["x0"], space.get("mean"), space.get("std")
        else:
            x0 = _initial_theta(self.getInitialModel(), layout, num_classes, loss_name)
            if self.getInitialModel() is None and layout.fit_intercept and not private:
                # (the label counts are data: a private fit starts from zero)
                x0 = self._start(x0, layout, facts, loss_name)
            if line_search or standardize:
                mean, std = engine.moments(layout.d)
            space = {"x0": x0} if mean is None else {"x0": x0, "mean": mean, "std": std}
        self._recovery.space = space
        if ck is not None:
            ck.space_arrays = space
        penalty = Penalty(layout, self.getRegParam(), self.getElasticNetParam(),
                          feature_scale=std if standardize else None)
        if std is not None:
            # Line-search methods step where every coordinate has about the same
            # curvature, the loss's and the penalty's (the objective is unchanged);
            # fixed-step methods step in the space the user chose the step for: the
            # original one, or the standardized one.
            pre = stats.Preconditioner(
                mean, std, layout, center=line_search,
                constant_scale=0.0 if standardize else 1.0,
                l2=penalty.l2_weights[:layout.d] if line_search else None,
                curvature=loss.curvature)
        codec = codecs.parse(self.getCompression())
        mode = self.getMode()
        saving = dict(checkpoint=ck, resumed=resumed, recovery=self._recovery)
        if mode == "local":
            work = local.Work(optimizer, step, self.getLocalSteps(),
                              self.getMiniBatchFraction(), self.getSeed(), self.getRegParam(),
                              self.getElasticNetParam(), std if standardize else None)
            result = local.fit(engine, loss, layout, penalty, work, x0,
                               max_iter=self.getMaxIter(), tol=self.getTol(), codec=codec,
                               **saving)
        elif mode == "async":
            weight = sum(i["wsum"] for i in facts.infos)
            result = ps.fit(engine, loss, layout, penalty, x0, weight=weight, pre=pre,
                            step_size=step, fraction=self.getMiniBatchFraction(),
                            seed=self.getSeed(), staleness=self.getStaleness(),
                            max_iter=self.getMaxIter(), tol=self.getTol(), codec=codec,
                            **saving)
        elif private:
            plan = dp.Plan(facts.num_rows, self.getMiniBatchFraction(), self.getMaxIter(),
                           self.getMaxGradNorm(), delta=self.getDpDelta(),
                           epsilon=self.getDpEpsilon(), sigma=self.getNoiseMultiplier())
            log.info("DP-SGD: noise multiplier %.4g for %d steps at sampling rate %g "
                     "(delta %g, clip %g)", plan.sigma, plan.steps, plan.q, plan.delta,
                     plan.clip)
            objective = dp.PrivateObjective(engine, loss, layout, penalty, plan)
            # tol reads the data: a private fit takes all its maxIter steps
            result = sync.fit(objective, x0, optimizer=optimizer, max_iter=self.getMaxIter(),
                              tol=0.0, step_size=step, **saving)
            privacy_summary = plan.summary(result.iterations)
        else:
            objective = sync.DistributedObjective(
                engine, loss, layout, penalty, codec=codec,
                theta_codec=sync.theta_codec_for(codec, self.getOptimizer(), step))
            def run_sync():
                return sync.fit(objective, x0, optimizer=optimizer,
                                max_iter=self.getMaxIter(), tol=self.getTol(), step_size=step,
                                precondition=pre,
                                mini_batch_fraction=self.getMiniBatchFraction(),
                                seed=self.getSeed(), **saving)

            try:
                result = run_sync()
            except checkpoint.ReplayMismatch as e:
                if resumed is not None:
                    raise               # the user's checkpoint: say so, change nothing
                # what this fit kept in memory does not replay: compute it again
                log.warning("%s; the fit starts over", e)
                self._recovery.replay = None
                self._recovery.iteration, self._recovery.times = 0, []
                result = run_sync()
        return _Trained(result, layout, loss_name, loss, num_classes, facts, engine.rejected,
                        engine.task_skews(), engine.rows_per_task(), engine.rejected_pushes,
                        ck, privacy_summary if private else None)

    def _checkpointer(self, facts):
        """-> (Checkpointer, the checkpoint's meta to resume from, or None), or
        (None, None) without checkpointDir."""
        directory = self.getCheckpointDir()
        if not directory:
            return None, None
        if directory.startswith("file://"):
            directory = directory[len("file://"):]
        ck = checkpoint.Checkpointer(os.path.abspath(directory), self.getCheckpointInterval(),
                                     self._param_values(), facts, self.getMode())
        meta = None
        if self.getResume() or self._checkpoint_started:
            meta = ck.load()
            if meta is None and self.getResume():
                log.info("no checkpoint in %s: the fit starts from iteration 0",
                         ck.dir)
        else:
            checkpoint.clear_directory(ck.dir)
        self._checkpoint_started = True
        return ck, meta

    def _start(self, x0, layout, facts, loss_name):
        """The starting point of a fit from scratch (zeros unless a subclass knows better)."""
        return x0

    def _identify(self, coef, intercept):
        return coef, intercept


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
        self._loss(None)

    def _loss(self, num_classes):
        name = self.getOrDefault(self.loss)
        if name == "squared":
            return name, kernels.make_loss(name)
        if name == "huber":
            eps = self.getOrDefault(self.epsilon)
            if not 0 < eps < math.inf:
                raise SparkgdError(f"epsilon must be a finite number > 0 (got {eps})")
            return name, kernels.make_loss(name, epsilon=eps)
        raise SparkgdError(f"unknown loss '{name}' for LinearRegression; "
                           "expected squared or huber")


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

    def _num_classes(self, facts):
        """2 for binomial; max label + 1 (at least 2) when labels are class indices."""
        lo, hi, integral = facts.label_range()
        if self.getFamily() == "binomial" or not integral or lo < 0:
            return 2  # labels that are no class indices fail _check_labels
        k = int(hi) + 1
        if k > max(2, min(facts.num_rows, 100000)):
            raise SparkgdError(
                f"label column '{self.getLabelCol()}' holds {hi:g}: that would be {k} classes "
                f"for {facts.num_rows} rows; labels must be class indices 0, 1, 2, ...")
        return max(k, 2)

    def _loss(self, num_classes):
        if self.getFamily() == "multinomial" or (num_classes or 2) > 2:
            return "multinomial", kernels.make_loss("multinomial")
        return "logistic", kernels.make_loss("logistic")

    def _start(self, x0, layout, facts, loss_name):
        """Intercepts that match the label distribution, as Spark ML starts: log-odds
        for binomial, centred log(count + 1) for multinomial. Fewer iterations; the
        optimum is the same."""
        counts = facts.label_weights()
        if counts is None:
            return x0
        x0 = x0.copy()
        if loss_name == "logistic":
            counts = np.pad(counts, (0, max(0, 2 - counts.shape[0])))
            if counts.shape[0] == 2 and counts[0] > 0 and counts[1] > 0:
                x0[layout.n_coef] = np.log(counts[1] / counts[0])
        elif counts.shape[0] <= layout.k:
            raw = np.log1p(np.pad(counts, (0, layout.k - counts.shape[0])))
            x0[layout.n_coef:] = raw - raw.mean()
        return x0

    def _identify(self, coef, intercept):
        if coef.shape[0] > 1:
            # softmax is unchanged by a common shift: intercepts (never penalized) are
            # centred; coefficients too when nothing else pins them (as Spark ML).
            if self.getFitIntercept():
                intercept = intercept - intercept.mean()
            if self.getRegParam() == 0:
                coef = coef - coef.mean(axis=0, keepdims=True)
        return coef, intercept


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

    def _loss(self, num_classes):
        return "hinge", kernels.make_loss("hinge")

    def _num_classes(self, facts):
        return 2


# ----------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------


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
    _estimator_class = None

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
        m._coef = np.array(coef, dtype=np.float64)  # (K, d)
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
    _estimator_class = LinearRegression

    def _transform(self, dataset):
        return dataset.withColumn(self.getPredictionCol(), self._margin_column(dataset))


class LogisticRegressionModel(_SparkgdModel, _Thresholds):
    _estimator_class = LogisticRegression

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
    _estimator_class = LinearSVC

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


LinearRegression._model_class = LinearRegressionModel
LogisticRegression._model_class = LogisticRegressionModel
LinearSVC._model_class = LinearSVCModel

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


for _cls in (LinearRegression, LogisticRegression, LinearSVC):
    _add_accessors(_cls, [p.name for p in _cls().params])
for _cls in (LinearRegressionModel, LogisticRegressionModel, LinearSVCModel):
    _add_accessors(_cls, MODEL_SETTERS)

#: Saved class name -> model class (``load_model`` looks names up here; nothing is eval'd).
MODEL_CLASSES = {cls.__name__: cls for cls in (LinearRegressionModel, LogisticRegressionModel,
                                               LinearSVCModel)}


def load_model(path):
    """Read a model written by ``model.save`` (``sparkgd.load_model``)."""
    from . import persist

    return persist.load_model(path, MODEL_CLASSES)
