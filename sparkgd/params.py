"""The params every sparkgd estimator and model shares, and the one place they are
checked (:func:`validate`; the command line calls it before Spark starts, naming its
flags instead).

Spark ML's names (and mixins) where Spark ML has the param, so the estimators sit in
a ``Pipeline`` and ``CrossValidator``; sparkgd's own for the rest (DESIGN section 2).
"""
from __future__ import annotations

import math

import numpy as np
from pyspark.ml import Model
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import (
    HasAggregationDepth,
    HasCheckpointInterval,
    HasElasticNetParam,
    HasFeaturesCol,
    HasFitIntercept,
    HasLabelCol,
    HasMaxIter,
    HasPredictionCol,
    HasRegParam,
    HasSeed,
    HasStandardization,
    HasStepSize,
    HasTol,
    HasWeightCol,
)

from . import codecs, data, optim
from .comm import TOPOLOGIES
from .errors import SparkgdError

#: How the tasks update the model (the ``mode`` param).
MODES = ("sync", "local", "async")


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


def validate(est):
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
