"""The training summary a model carries and saves."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class TrainingSummary:
    """What a fit did. ``objectiveHistory[-1]`` is F at the returned coefficients."""

    objectiveHistory: list = field(default_factory=list)
    totalIterations: int = 0
    trainingSeconds: float = 0.0
    #: bytes sent on every link (theta out, partial results back, tree levels), whole fit
    bytesCommunicated: int = 0
    #: the part of it into and out of the driver
    driverBytes: int = 0
    numEvaluations: int = 0
    converged: bool = False
    message: str = ""
    numRows: int = 0
    numPartitions: int = 0
    #: connections the driver's hub dropped: strangers on its port, bad or replayed
    #: frames, stalled tasks (none on a quiet network)
    droppedConnections: int = 0
    #: seconds from the start of training at which each objectiveHistory entry was known
    objectiveTimes: list = field(default_factory=list)
    #: how the tasks updated the model: sync, local or async
    mode: str = "sync"
    #: per pass (async: per clock) the slowest serving task's time over the median's
    taskTimeSkew: list = field(default_factory=list)
    #: rows each serving task held
    rowsPerTask: list = field(default_factory=list)
    #: async: pushes not applied (duplicated, or not asked for)
    rejectedPushes: int = 0
    #: bytesCommunicated when each objectiveHistory entry was known (cumulative)
    bytesHistory: list = field(default_factory=list)
    #: the sums the training-data metrics derive from (:mod:`sparkgd.metrics`): one
    #: distributed pass at the returned coefficients
    metrics: dict = None
    #: DP-SGD: epsilon spent, delta, noiseMultiplier, maxGradNorm, samplingRate, steps,
    #: accountant (:mod:`sparkgd.modes.dp`); None without DP
    privacy: dict = None
    #: what carried the passes: ``served`` (tasks holding the blocks in memory),
    #: ``files`` (block files, serving tasks) or ``jobs`` (one Spark job per pass)
    engine: str = ""
    #: coefficient statistics (:mod:`sparkgd.inference`): their values, or
    #: ``{"error": why}`` where a fit has none
    inference: dict = None

    def __getattr__(self, name):
        """Spark ML's training-summary metrics (``r2``, ``rootMeanSquaredError``,
        ``areaUnderROC``, ``accuracy``, ``precisionByLabel``, ``logLoss``, ...) and
        ``predictions`` (in the session that fitted the model)."""
        if name.startswith("_") or name in ("metrics",):
            raise AttributeError(name)   # (IPython's _repr_*_ probes start no Spark job)
        evaluation = self._evaluated()
        if evaluation is not None and (hasattr(type(evaluation), name) or name in (
                "predictionCol", "labelCol", "featuresCol", "weightCol")):
            return getattr(evaluation, name)
        why = self.__dict__.get("_no_metrics")
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}" +
                             (f" ({why})" if why else ""))

    def _statistic(self, name):
        from .errors import SparkgdError

        stats = self.inference or {"error": "this summary carries no coefficient statistics"}
        if "error" in stats:
            raise SparkgdError(f"no {name}: {stats['error']}")
        value = stats[name]
        return np.asarray(value) if isinstance(value, list) else value

    @property
    def coefficientStandardErrors(self):
        """Standard errors of the coefficients, the intercept last (an unpenalized linear
        or binomial logistic fit; see :mod:`sparkgd.inference`)."""
        return self._statistic("coefficientStandardErrors")

    @property
    def tValues(self):
        """Coefficient / standard error, the intercept last (Wald z for logistic)."""
        return self._statistic("tValues")

    @property
    def pValues(self):
        """Two-sided p-values of tValues (Student's t with degreesOfFreedom for linear
        regression, the normal for logistic), the intercept last."""
        return self._statistic("pValues")

    @property
    def degreesOfFreedom(self):
        """Rows minus coefficients (the intercept counted): from the coefficient
        statistics, else (any regression fit) from the training metrics, as Spark ML."""
        stats = self.inference or {}
        if "degreesOfFreedom" in stats:
            return stats["degreesOfFreedom"]
        evaluation = self._evaluated()
        if evaluation is not None and hasattr(type(evaluation), "degreesOfFreedom"):
            return evaluation.degreesOfFreedom
        return self._statistic("degreesOfFreedom")

    @property
    def dispersion(self):
        """Residual variance sum(w r^2) / degreesOfFreedom (linear), 1 (logistic)."""
        return self._statistic("dispersion")

    def _evaluated(self):
        """The metrics' summary object: saved sums, or (after a fit in this session)
        one pass over the training data at the returned coefficients."""
        from . import metrics

        evaluation = self.__dict__.get("_evaluation")
        if evaluation is None and self.metrics:
            scored = self.__dict__.get("_scored")
            evaluation = metrics.from_dict(self.metrics, None if scored is None else
                                           (lambda: scored[0].transform(scored[1])))
        elif evaluation is None and self.__dict__.get("_pending") is not None:
            from .errors import SparkgdError

            model, dataset = self.__dict__.pop("_pending")
            try:
                evaluation = metrics.evaluate(model, dataset)
                self.metrics = evaluation.to_dict()
            except SparkgdError as e:
                self.__dict__["_no_metrics"] = str(e)
        self.__dict__["_evaluation"] = evaluation
        return evaluation

    def plot(self, path, title=None):
        """A PNG at ``path``: the objective against iterations and seconds (log of
        F - F_min) and the bytes each iteration sent (needs matplotlib)."""
        from .plot import plot_summary

        return plot_summary(self, path, title=title)

    def to_dict(self):
        self._evaluated()   # a summary saved with its model carries the metrics
        out = asdict(self)
        # DESIGN.md section 4: the statistics are fields of the saved summary too
        out.update({k: v for k, v in (self.inference or {}).items() if k != "error"})
        return out

    @classmethod
    def from_dict(cls, d):
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})
