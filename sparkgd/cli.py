"""The command line of ``jobs/train.py``.

Bad usage or bad input ends with one line ``sparkgd: error: <what and where>``
on stderr and exit status 2; nothing is written to ``--output`` then (a model
already there stays as it was). Everything that can be checked before Spark
starts is checked first.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time

from .errors import SparkgdError
from .optim import OPTIMIZERS

LOSS_ESTIMATOR = {"squared": "LinearRegression", "huber": "LinearRegression",
                  "logistic": "LogisticRegression", "multinomial": "LogisticRegression",
                  "hinge": "LinearSVC"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise SparkgdError(message)


def _int(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None


def _float(text):
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None


def _positive_int(text):
    """--partitions: the command line's own knob (the estimators have no such param)."""
    v = _int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def _column_list(text):
    cols = [c.strip() for c in text.split(",")]
    if not cols or any(not c for c in cols):
        raise argparse.ArgumentTypeError(f"expected comma-separated column names, got '{text}'")
    return cols


def build_parser(default_data=None):
    p = _Parser(
        prog="jobs/train.py",
        description="Train a linear model with distributed gradient descent on Spark.")
    p.add_argument("--data", default=default_data,
                   help="Parquet file or partitioned directory (default: the bundled sample)")
    p.add_argument("--format", default="parquet", choices=["parquet", "libsvm"],
                   help="input format")
    p.add_argument("--num-features", type=_int, default=None,
                   help="libsvm: number of features (default: the largest index in the data)")
    p.add_argument("--features-col", default="features",
                   help="features column: array<double|float> or Spark ML vector")
    p.add_argument("--feature-cols", type=_column_list, default=None,
                   help="comma-separated numeric columns to use as features instead")
    p.add_argument("--label-col", default="label")
    p.add_argument("--weight-col", default=None)
    p.add_argument("--loss", default="logistic", choices=sorted(LOSS_ESTIMATOR),
                   help="logistic (binary, or multiclass labels -> multinomial), multinomial, "
                        "squared, huber, hinge (linear SVM)")
    p.add_argument("--epsilon", type=_float, default=1.35, help="huber epsilon")
    p.add_argument("--optimizer", default="lbfgs", help=", ".join(OPTIMIZERS))
    p.add_argument("--compression", default="none",
                   help="what serving tasks send: none, fp16, topk:<fraction> (error feedback) "
                        "or qsgd:<bits>; lossy ones need a first-order optimizer")
    p.add_argument("--topology", default="tree",
                   help="how serving tasks combine a pass: tree (fan-in from "
                        "--aggregation-depth), star (every task to the driver) or ring "
                        "(reduce-scatter among the tasks)")
    p.add_argument("--mode", default="sync",
                   help="sync (bulk-synchronous), local (local SGD: --local-steps on each "
                        "task, then the models are averaged) or async (parameter server on "
                        "the driver, tasks at most --staleness clocks apart; sgd)")
    p.add_argument("--local-steps", type=_int, default=10,
                   help="mode local: optimizer steps each task takes between averagings")
    p.add_argument("--staleness", type=_int, default=2,
                   help="mode async: clocks a task may run ahead of the slowest (0: sync)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="local directory where the driver saves the fit's state every "
                        "--checkpoint-interval iterations (default: no checkpoints)")
    p.add_argument("--checkpoint-interval", type=_int, default=10,
                   help="iterations between checkpoints (-1: none)")
    p.add_argument("--resume", action="store_true",
                   help="go on from the checkpoint in --checkpoint-dir (refused if written "
                        "for other data or params; from iteration 0 if there is none)")
    p.add_argument("--max-iter", type=_int, default=100)
    p.add_argument("--tol", type=_float, default=1e-6)
    p.add_argument("--reg-param", type=_float, default=0.0)
    p.add_argument("--elastic-net-param", type=_float, default=0.0,
                   help="L1 share of the penalty, in [0, 1]")
    p.add_argument("--step-size", type=_float, default=None,
                   help="step size (gd: fixed step instead of backtracking)")
    p.add_argument("--mini-batch-fraction", type=_float, default=1.0,
                   help="sgd: fraction of rows sampled afresh each iteration")
    p.add_argument("--seed", type=int, default=0, help="seed of the sgd samples")
    p.add_argument("--standardization", action="store_true",
                   help="penalize standardized coefficients (Spark ML's meaning)")
    p.add_argument("--no-intercept", action="store_true", help="fit without an intercept")
    p.add_argument("--initial-model", default=None, help="warm start from a saved model")
    p.add_argument("--aggregation-depth", type=_int, default=2)
    p.add_argument("--dtype", default="float64",
                   help="float64 or float32: how the cached blocks store dense features (float32: half the "
                        "memory; sums stay float64)")
    p.add_argument("--partitions", type=_positive_int, default=None,
                   help="repartition the input into this many partitions")
    p.add_argument("--output", default="out/model",
                   help="directory to save the model to (replaced atomically on success)")
    return p


def _is_local(path):
    return "://" not in path or path.startswith("file://")


def _strip_file(path):
    return path[len("file://"):] if path.startswith("file://") else path


def check_paths(args):
    """Checks that need no Spark: the input exists, the output can be written."""
    if not args.data:
        raise SparkgdError("--data is required (no bundled sample found)")
    if _is_local(args.data) and not os.path.exists(_strip_file(args.data)):
        raise SparkgdError(f"--data '{args.data}': no such file or directory")
    if args.initial_model is not None:
        if not _is_local(args.initial_model) or not os.path.isfile(
                os.path.join(_strip_file(args.initial_model), "metadata.json")):
            raise SparkgdError(f"--initial-model '{args.initial_model}': not a saved sparkgd "
                               "model (no metadata.json there)")
    if args.format == "libsvm" and (args.feature_cols or args.weight_col):
        raise SparkgdError("--format libsvm has only 'label' and 'features' columns; "
                           "--feature-cols and --weight-col do not apply")
    out = args.output
    if not _is_local(out):
        raise SparkgdError(f"--output '{out}': only local paths are supported")
    out = os.path.abspath(_strip_file(out))
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise SparkgdError(f"--output '{args.output}' exists and is not a directory")
        if os.listdir(out) and not os.path.isfile(os.path.join(out, "metadata.json")):
            raise SparkgdError(
                f"--output '{args.output}' is a non-empty directory that is not a sparkgd "
                "model; refusing to replace it")
    parent = os.path.dirname(out)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.access(parent, os.W_OK):
        raise SparkgdError(f"--output '{args.output}': directory '{parent}' is not writable")


def _flag_names(message, estimator):
    """``aggregationDepth must be ...`` -> ``--aggregation-depth must be ...``."""
    first, _, rest = message.partition(" ")
    if first == "numFeatures" or (estimator is not None and estimator.hasParam(first)):
        flag = "--" + re.sub(r"([A-Z])", lambda m: "-" + m.group(1).lower(), first)
        return f"{flag} {rest}"
    return message


def read_data(spark, args):
    try:
        if args.format == "libsvm":
            from .data import read_libsvm

            return read_libsvm(spark, args.data, args.num_features,
                               features_col=args.features_col)
        return spark.read.parquet(args.data)
    except SparkgdError as e:
        raise SparkgdError(_flag_names(str(e), None)) from None
    except Exception as e:  # AnalysisException, or a SparkException from the footer read
        text = str(e).strip()
        first = text.splitlines()[0] if text else type(e).__name__
        raise SparkgdError(f"cannot read --data '{args.data}' as {args.format}: {first}") \
            from None


def make_estimator(args):
    from . import estimators

    common = dict(
        featuresCol=args.features_col, featureCols=args.feature_cols, labelCol=args.label_col,
        weightCol=args.weight_col, maxIter=args.max_iter, tol=args.tol,
        regParam=args.reg_param, elasticNetParam=args.elastic_net_param,
        fitIntercept=not args.no_intercept, standardization=args.standardization,
        aggregationDepth=args.aggregation_depth, optimizer=args.optimizer,
        stepSize=args.step_size, miniBatchFraction=args.mini_batch_fraction, seed=args.seed,
        dtype=args.dtype, compression=args.compression, topology=args.topology,
        mode=args.mode, localSteps=args.local_steps, staleness=args.staleness,
        checkpointDir=args.checkpoint_dir, checkpointInterval=args.checkpoint_interval,
        resume=args.resume,
        initialModel=_strip_file(args.initial_model) if args.initial_model else None)
    cls = getattr(estimators, LOSS_ESTIMATOR[args.loss])
    if cls is estimators.LinearRegression:
        common.update(loss=args.loss, epsilon=args.epsilon)
    elif args.loss == "multinomial":
        common["family"] = "multinomial"
    return cls(**common)


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time (not the one it was made with,
    which a caller, or a test capturing output, may have closed since)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging():
    log = logging.getLogger("sparkgd")
    if not log.handlers:
        h = _StdoutHandler()
        h.setFormatter(logging.Formatter("sparkgd: %(message)s"))
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False


def run(args):
    from pyspark.sql import SparkSession

    check_paths(args)
    estimator = make_estimator(args)
    try:   # the estimator checks its params (before Spark starts); name the flags
        estimator._validate()
    except SparkgdError as e:
        raise SparkgdError(_flag_names(str(e), estimator)) from None
    estimator._source_name = f"--data '{args.data}'"
    spark = SparkSession.builder.appName("sparkgd").getOrCreate()
    df = read_data(spark, args)
    if args.partitions:
        df = df.repartition(args.partitions)
    _setup_logging()
    started = time.perf_counter()
    model = estimator.fit(df)
    s = model.summary
    print(f"sparkgd: done: {s.totalIterations} iterations, objective "
          f"{s.objectiveHistory[-1]:.12g}, {s.trainingSeconds:.2f}s training, "
          f"{time.perf_counter() - started:.2f}s with data preparation, "
          f"{s.bytesCommunicated} bytes communicated, {s.driverBytes} of them through the "
          f"driver ({s.message})")
    model.save(args.output, overwrite=True)
    print(f"sparkgd: model ({model.numFeatures} features) saved to {args.output}")
    return model


def main(argv=None, default_data=None):
    try:
        args = build_parser(default_data).parse_args(argv)
        run(args)
    except SparkgdError as e:
        msg = " ".join(str(e).split())
        print(f"sparkgd: error: {msg}", file=sys.stderr)
        return 2
    return 0
