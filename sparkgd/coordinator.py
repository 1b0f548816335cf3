"""The coordinator: one fit, run from a plain plan over an engine.

    Plan (the params, the input's spec)  +  Engine (the blocks; a pass over them)
      -> the loss, once the labels are known; the start; the space the optimizer steps in
      -> the mode's loop (modes/: sync, local, async; DP-SGD is sync's private variant)
      -> coefficients, summary, and the training metrics (one more pass over the blocks)
      = Outcome

:func:`train` is the whole of it. It runs wherever the session lets it
(:mod:`sparkgd.launch`): in the driver for a classic session, inside a task of the
fit's own job for a Spark Connect session (:mod:`sparkgd.connect`), or in a Connect
client over one Spark job per pass. What it takes (:class:`Plan`) and gives
(:class:`Outcome`) is plain and picklable; it never touches a SparkContext, and the
checkpoints it writes are the same wherever it runs.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np

from . import checkpoint, codecs, inference, kernels, metrics, multi, stats
from .errors import SparkgdError
from .modes import Keep, Problem, dp, local, ps, sync
from .penalties import Penalty

log = logging.getLogger("sparkgd")

#: The loop of each mode (one signature: :mod:`sparkgd.modes`).
LOOPS = {"sync": sync.fit, "local": local.fit, "async": ps.fit, "dp": dp.fit}

#: The estimators a plan can be of, by the model they fit.
MODEL_KINDS = ("regression", "logistic", "svc")


@dataclass
class Plan:
    """Everything a fit needs that is not data: what the estimator's params say,
    checked (:func:`sparkgd.params.validate`), as plain values."""

    model: str                       # regression | logistic | svc
    spec: object                     # sparkgd.data.InputSpec: how the input is read
    source: str = "the DataFrame"    # for messages
    params: dict = field(default_factory=dict)   # every param with a value (JSON-able)
    loss: str = "squared"            # regression: squared | huber
    epsilon: float = 1.35            # huber
    family: str = "auto"             # logistic: auto | binomial | multinomial
    fit_intercept: bool = True
    reg_param: float = 0.0
    elastic_net_param: float = 0.0
    standardization: bool = False
    optimizer: str = "lbfgs"
    step_size: float = None          # None: the optimizer's own (gd: a line search)
    max_iter: int = 100
    tol: float = 1e-6
    mini_batch_fraction: float = 1.0
    seed: int = 0
    mode: str = "sync"
    local_steps: int = 10
    staleness: int = 2
    topology: str = "tree"
    aggregation_depth: int = 2
    compression: str = "none"
    dtype: str = "float64"
    checkpoint_dir: str = None
    checkpoint_interval: int = 10
    resume: bool = False
    dp: dict = None                  # DP-SGD: epsilon, delta, sigma, clip (None: off)
    initial: tuple = None            # warm start: (coef (K, d), intercept (K,))
    threshold: float = None          # the model's prediction rule, for its metrics
    thresholds: list = None
    label_col: str = "label"

    @property
    def line_search(self):
        return self.optimizer == "lbfgs" or (self.optimizer == "gd" and self.step_size is None)

    @property
    def engine_topology(self):
        """async pushes to the server on the driver: the star, whatever was asked."""
        return "star" if self.mode == "async" else self.topology


@dataclass
class Outcome:
    """What a fit gives the model: plain values."""

    coef: np.ndarray                 # (K, d): d the fit's width (see columns)
    intercept: np.ndarray            # (K,)
    loss_name: str
    loss_params: dict
    num_classes: int
    summary: dict                    # sparkgd.summary.TrainingSummary's fields
    metrics: dict = None             # the training metrics' sums (sparkgd.metrics)
    no_metrics: str = None           # why there are none
    columns: np.ndarray = None       # sparse data: the data's column of each of coef's
    width: int = None                # ... out of the data's width (None: coef is whole)

    def full_coef(self):
        """The coefficients at the data's width: zero where no row has a value (the
        penalty alone pulls there, to exactly 0 at the optimum)."""
        if self.columns is None:
            return self.coef
        out = np.zeros((self.coef.shape[0], int(self.width)))
        out[:, self.columns] = self.coef
        return out


class Attempts:
    """What one fit keeps across the attempts of its engine (a lost serving task
    costs a rebuild of the blocks, and the fit goes on): the in-memory recovery, and
    whether this fit has started its checkpoints (a later attempt resumes its own)."""

    def __init__(self):
        self.recovery = checkpoint.Recovery()
        self.started = False
        self.checkpoint = None

    def checkpointer(self, plan, facts, layout):
        """-> (Checkpointer, the checkpoint's meta to resume from, or None), or
        (None, None) without ``checkpointDir``."""
        directory = plan.checkpoint_dir
        if not directory:
            return None, None
        if directory.startswith("file://"):
            directory = directory[len("file://"):]
        ck = checkpoint.Checkpointer(os.path.abspath(directory), plan.checkpoint_interval,
                                     plan.params, facts, plan.mode, layout.size, layout.d)
        meta = None
        if plan.resume or self.started:
            meta = ck.load()
            if meta is None and plan.resume:
                log.info("no checkpoint in %s: the fit starts from iteration 0", ck.dir)
        else:
            checkpoint.clear_directory(ck.dir)
        self.started = True
        self.checkpoint = ck
        return ck, meta

    def done(self):
        """The fit ended well (and its engine vouched for every pass): its checkpoint
        is no longer needed."""
        if self.checkpoint is not None:
            self.checkpoint.remove()


# ----------------------------------------------------------------------------- the loss


def num_classes(plan, facts):
    """2 for binary models; for logistic regression, max label + 1 (at least 2) when
    the labels are class indices (labels that are not fail :func:`check_labels`)."""
    if plan.model != "logistic":
        return None if plan.model == "regression" else 2
    lo, hi, integral = facts.label_range()
    if plan.family == "binomial" or not integral or lo < 0:
        return 2
    k = int(hi) + 1
    if k > max(2, min(facts.num_rows, 100000)):
        raise SparkgdError(
            f"label column '{plan.label_col}' holds {hi:g}: that would be {k} classes "
            f"for {facts.num_rows} rows; labels must be class indices 0, 1, 2, ...")
    return max(k, 2)


def make_loss(plan, classes):
    """-> (the loss's name, the loss)."""
    if plan.model == "svc":
        return "hinge", kernels.make_loss("hinge")
    if plan.model == "logistic":
        if plan.family == "multinomial" or (classes or 2) > 2:
            return "multinomial", kernels.make_loss("multinomial")
        return "logistic", kernels.make_loss("logistic")
    if plan.loss == "squared":
        return "squared", kernels.make_loss("squared")
    if plan.loss == "huber":
        if not 0 < plan.epsilon < float("inf"):
            raise SparkgdError(f"epsilon must be a finite number > 0 (got {plan.epsilon})")
        return "huber", kernels.make_loss("huber", epsilon=plan.epsilon)
    raise SparkgdError(f"unknown loss '{plan.loss}' for LinearRegression; "
                       "expected squared or huber")


def check_labels(plan, facts, loss_name):
    """Labels the loss can take, or a one-line error naming the column."""
    lo, hi, integral = facts.label_range()
    label = plan.label_col
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


def initial_theta(plan, layout, classes, loss_name, facts=None):
    """The start before any adjustment: zeros, or the warm start's coefficients (at
    the fit's columns, for sparse data)."""
    if plan.initial is None:
        return layout.zeros()
    coef, icpt = (np.asarray(a, dtype=np.float64) for a in plan.initial)
    width = layout.d if facts is None else facts.width
    if coef.ndim != 2 or coef.shape[1] != width:
        raise SparkgdError(f"initialModel has {coef.shape[-1]} features but the data has "
                           f"{width}")
    if facts is not None and facts.columns is not None:
        coef = coef[:, facts.columns]
    if coef.shape[0] != layout.k:
        raise SparkgdError(f"initialModel has {coef.shape[0]} coefficient row(s) but this fit "
                           f"needs {layout.k} ({loss_name} loss, {classes} classes)")
    return layout.join(coef, icpt)


def label_start(x0, layout, facts, loss_name):
    """Intercepts that match the label distribution, as Spark ML starts: log-odds for
    binomial, centred log(count + 1) for multinomial. Fewer iterations; the optimum is
    the same."""
    counts = facts.label_weights()
    if counts is None:
        return x0
    x0 = x0.copy()
    if loss_name == "logistic":
        counts = np.pad(counts, (0, max(0, 2 - counts.shape[0])))
        if counts.shape[0] == 2 and counts[0] > 0 and counts[1] > 0:
            x0[layout.n_coef] = np.log(counts[1] / counts[0])
    elif loss_name == "multinomial" and counts.shape[0] <= layout.k:
        raw = np.log1p(np.pad(counts, (0, layout.k - counts.shape[0])))
        x0[layout.n_coef:] = raw - raw.mean()
    return x0


def identify(plan, coef, intercept):
    """Softmax is unchanged by a common shift: multinomial intercepts (never penalized)
    are centred; coefficients too when nothing else pins them (as Spark ML)."""
    if coef.shape[0] > 1:
        if plan.fit_intercept:
            intercept = intercept - intercept.mean()
        if plan.reg_param == 0:
            coef = coef - coef.mean(axis=0, keepdims=True)
    return coef, intercept


# ----------------------------------------------------------------------------- the fit


def problem_of(plan, engine, facts, layout, loss, attempts, resumed, ck):
    """The start and the space the optimizer steps in: part of what a fit keeps and
    checkpoints, so a fit that goes on (a lost task, a lost driver) takes the one it
    started with, to the bit, whatever grouping of the rows the moments are summed in
    now."""
    private = plan.dp is not None
    standardize = plan.standardization
    recovery = attempts.recovery
    mean = std = pre = None
    space = recovery.space or (ck.space() if resumed else None)
    if space is not None and np.shape(space["x0"]) != (layout.size,):
        # kept at another width (sparse data fitted at its touched columns on one store,
        # at its whole width on another): it does not apply; the fit starts over
        log.warning("the kept start has %d values, this fit %d: the fit starts over",
                    np.size(space["x0"]), layout.size)
        recovery.replay = recovery.snapshot = None
        recovery.iteration, recovery.times = 0, []
        space = None
    if space is not None:
        x0, mean, std = space["x0"], space.get("mean"), space.get("std")
    else:
        loss_name = loss.name
        x0 = initial_theta(plan, layout, num_classes(plan, facts), loss_name, facts)
        if plan.initial is None and layout.fit_intercept and not private:
            # (the label counts are data: a private fit starts from zero)
            if plan.model == "logistic":
                x0 = label_start(x0, layout, facts, loss_name)
        if plan.line_search or standardize:
            mean, std = engine.moments(layout.d)
        space = {"x0": x0} if mean is None else {"x0": x0, "mean": mean, "std": std}
    recovery.space = space
    if ck is not None:
        ck.space_arrays = space
    penalty = Penalty(layout, plan.reg_param, plan.elastic_net_param,
                      feature_scale=std if standardize else None)
    if std is not None:
        # Line-search methods step where every coordinate has about the same
        # curvature, the loss's and the penalty's (the objective is unchanged);
        # fixed-step methods step in the space the user chose the step for: the
        # original one, or the standardized one.
        pre = stats.Preconditioner(
            mean, std, layout, center=plan.line_search,
            constant_scale=0.0 if standardize else 1.0,
            l2=penalty.l2_weights[:layout.d] if plan.line_search else None,
            curvature=loss.curvature)
    weight = float(sum(i["wsum"] for i in facts.infos))
    return Problem(loss, layout, penalty, x0, pre, std if standardize else None,
                   codecs.parse(plan.compression), weight=weight, rows=facts.num_rows)


def train(plan, engine, attempts=None, metrics_pass=True):
    """One fit of ``plan`` over ``engine``'s blocks -> :class:`Outcome`.
    ``metrics_pass=False``: no pass for the training metrics (the model's summary
    computes them from its DataFrame if ever asked: fitMultiple's models are scored on
    other data)."""
    attempts = attempts or Attempts()
    facts = engine.facts
    classes = num_classes(plan, facts)
    loss_name, loss = make_loss(plan, classes)
    check_labels(plan, facts, loss_name)
    layout = kernels.Layout(facts.num_features, loss.n_outputs(classes), plan.fit_intercept)
    ck, resumed = attempts.checkpointer(plan, facts, layout)
    if not attempts.recovery.vouch(facts):
        log.warning("the blocks built again hold other data than the lost ones "
                    "(%s): the fit starts over", checkpoint.fingerprint(facts))
    problem = problem_of(plan, engine, facts, layout, loss, attempts, resumed, ck)
    keep = Keep(ck, resumed, attempts.recovery)
    result = LOOPS["dp" if plan.dp is not None else plan.mode](engine, problem, plan, keep)
    coef, intercept = layout.split(result.theta)
    coef, intercept = identify(plan, coef.copy(), intercept.copy())
    summary = dict(
        objectiveHistory=result.objective_history, totalIterations=result.iterations,
        trainingSeconds=result.seconds, bytesCommunicated=result.bytes_communicated,
        driverBytes=result.driver_bytes, numEvaluations=result.evaluations,
        converged=result.converged, message=result.message, numRows=facts.num_rows,
        numPartitions=facts.num_partitions, droppedConnections=engine.rejected,
        objectiveTimes=list(result.objective_times or []), mode=plan.mode,
        taskTimeSkew=[round(v, 3) for v in engine.task_skews()],
        rowsPerTask=engine.rows_per_task(), rejectedPushes=engine.rejected_pushes,
        bytesHistory=list(result.bytes_history or []), privacy=result.privacy,
        engine=engine.description)
    outcome = Outcome(coef, intercept, loss_name, loss.params(), classes, summary,
                      columns=facts.columns, width=facts.width)
    if result.privacy is not None:
        # exact training metrics would leave with the private model: none
        outcome.no_metrics = ("a private fit computes no training metrics (they are not "
                              "noised); use model.evaluate(held_out_df)")
    elif metrics_pass:
        started = time.perf_counter()
        outcome.metrics = training_metrics(plan, engine, layout, loss, loss_name, classes,
                                           coef, intercept)
        if outcome.metrics is not None:
            log.info("training metrics from the blocks in %.2f s (one pass; the fit's "
                     "training took %.2f s)", time.perf_counter() - started, result.seconds)
    summary["inference"] = coefficient_statistics(plan, engine, facts, layout, loss,
                                                  loss_name, coef, intercept,
                                                  result.privacy is not None)
    return outcome


def train_many(plans, engine, attempts):
    """Fits of ``plans`` (which read their data the same way: :func:`sparkgd.multi.groups`)
    together over ``engine``, their plain gradient passes shared -> their outcomes."""
    return multi.train_many(plans, engine, attempts,
                            lambda plan, view, att: train(plan, view, att, metrics_pass=False))


def coefficient_statistics(plan, engine, facts, layout, loss, loss_name, coef, intercept,
                           private):
    """The coefficient statistics (:mod:`sparkgd.inference`) from one more pass over the
    blocks at the returned coefficients, or ``{"error": why}`` where the fit has none."""
    untouched = None
    if facts.columns is not None and len(facts.columns) < facts.width:
        idle = np.setdiff1d(np.arange(min(facts.width, inference.MAX_FEATURES + 1)),
                            facts.columns)[:10]
        untouched = ("coefficient statistics need every column to hold a value; no row "
                     "has one in column(s) " + ", ".join(str(int(j)) for j in idle))
    why = inference.why_none(loss_name, layout.k, facts.width or layout.d, plan.reg_param,
                             private, untouched)
    if why is not None:
        return {"error": why}
    kind = inference.KINDS[loss_name]
    started = time.perf_counter()
    total = engine.evaluate(layout.join(coef, intercept), loss, layout, None, codecs.NONE,
                            work={"mode": "hessian", "kind": kind})
    spec = plan.spec
    names = list(spec.features) if spec.kind == "columns" else \
        [f"{spec.features[0]}[{j}]" for j in range(layout.d)]
    try:
        out = inference.statistics(total, coef[0], intercept, kind, layout.fit_intercept,
                                   names)
    except SparkgdError as e:
        return {"error": str(e)}
    log.info("coefficient statistics from the blocks in %.2f s (one pass)",
             time.perf_counter() - started)
    return out


def training_metrics(plan, engine, layout, loss, loss_name, classes, coef, intercept):
    """The training summary's metric sums, from one more pass over the blocks at the
    returned coefficients (as :func:`sparkgd.metrics.evaluate` would compute them from
    the training DataFrame, without reading it again); None where the blocks' pass
    does not carry them (more classes than :data:`~sparkgd.metrics.MAX_BLOCK_CLASSES`)."""
    rule = metrics.rule_of(plan.model, loss_name, classes, plan.threshold, plan.thresholds)
    if rule.get("k", 0) > metrics.MAX_BLOCK_CLASSES:
        return None
    theta = layout.join(coef, intercept)
    total = engine.evaluate(theta, loss, layout, None, codecs.NONE,
                            work={"mode": "metrics", "rule": rule})
    sums = metrics.sums_from_vector(total, rule, layout.d, plan.fit_intercept)
    sums.update(predictionCol=plan.params.get("predictionCol", "prediction"),
                labelCol=plan.label_col,
                featuresCol=plan.params.get("featuresCol", "features"),
                weightCol=plan.params.get("weightCol") or None)
    return sums
