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

from .errors import SparkgdError, first_line
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
        description="Train a linear model with distributed gradient descent on Spark.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    p.add_argument("--label-col", default="label", help="label column")
    p.add_argument("--weight-col", default=None, help="row weights column (none: all 1)")
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
    p.add_argument("--max-iter", type=_int, default=100,
                   help="iterations (mode local: rounds; mode async: clocks)")
    p.add_argument("--tol", type=_float, default=1e-6,
                   help="stop when the objective's relative change is at most this (0: run "
                        "all --max-iter)")
    p.add_argument("--reg-param", type=_float, default=0.0, help="penalty strength")
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
    p.add_argument("--aggregation-depth", type=_int, default=2,
                   help="topology tree: the fan-in is tasks ** (1 / depth)")
    p.add_argument("--dtype", default="float64",
                   help="float64 or float32: how the cached blocks store dense features (float32: half the "
                        "memory; sums stay float64)")
    p.add_argument("--partitions", type=_positive_int, default=None,
                   help="repartition the input into this many partitions")
    p.add_argument("--dp-epsilon", type=_float, default=None,
                   help="differential privacy (DP-SGD, first-order optimizers): the target "
                        "epsilon of the whole fit; the noise is calibrated to it")
    p.add_argument("--dp-delta", type=_float, default=None,
                   help="DP-SGD delta (default: 1/(10 n) rounded down to one digit)")
    p.add_argument("--max-grad-norm", type=_float, default=1.0,
                   help="DP-SGD: each row's gradient is clipped to this L2 norm")
    p.add_argument("--noise-multiplier", type=_float, default=None,
                   help="DP-SGD: noise std over --max-grad-norm, instead of --dp-epsilon")
    p.add_argument("--output", default="out/model",
                   help="directory to save the model to: a local path or a Hadoop-FS URI "
                        "(file:, hdfs://, s3a://); replaced atomically on success where the "
                        "file system renames atomically (local, HDFS; not object stores)")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="also write a PNG of the objective against iterations and seconds "
                        "and the bytes each iteration sent (needs matplotlib)")
    p.add_argument("--log-level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="sparkgd's progress lines (INFO: one per iteration)")
    return p


def _is_local(path):
    from .persist import local_path

    return local_path(path) is not None


def _strip_file(path):
    """The local path of a local path or ``file:`` URI."""
    from .persist import local_path

    return local_path(path)


def check_paths(args):
    """Checks that need no Spark: the input exists, the output can be written."""
    if not args.data:
        raise SparkgdError("--data is required (no bundled sample found)")
    if _is_local(args.data) and not os.path.exists(_strip_file(args.data)):
        raise SparkgdError(f"--data '{args.data}': no such file or directory")
    if args.initial_model is not None and _is_local(args.initial_model):
        if not os.path.isfile(
                os.path.join(_strip_file(args.initial_model), "metadata.json")):
            raise SparkgdError(f"--initial-model '{args.initial_model}': not a saved sparkgd "
                               "model (no metadata.json there)")
    if args.format == "libsvm" and (args.feature_cols or args.weight_col):
        raise SparkgdError("--format libsvm has only 'label' and 'features' columns; "
                           "--feature-cols and --weight-col do not apply")
    if args.plot is not None and (not args.plot.lower().endswith(".png") or
                                  not _is_local(args.plot)):
        raise SparkgdError(f"--plot '{args.plot}': expected a local path ending in .png")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401  (checked now: the plot comes after the save)
        except ImportError:
            raise SparkgdError("--plot needs matplotlib: pip install 'sparkgd[plot]'") \
                from None
    out = args.output
    if not _is_local(out):
        return            # another file system: checked once Spark is up (check_output)
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
        raise SparkgdError(f"cannot read --data '{args.data}' as {args.format}: "
                           f"{first_line(e)}") from None


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
        resume=args.resume, dpEpsilon=args.dp_epsilon, dpDelta=args.dp_delta,
        maxGradNorm=args.max_grad_norm, noiseMultiplier=args.noise_multiplier,
        initialModel=(_strip_file(args.initial_model) or args.initial_model)
        if args.initial_model else None)
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


def _setup_logging(level="INFO"):
    """sparkgd's progress through Python logging: ``sparkgd: <message>`` on stdout."""
    log = logging.getLogger("sparkgd")
    if not log.handlers:
        h = _StdoutHandler()
        h.setFormatter(logging.Formatter("sparkgd: %(message)s"))
        log.addHandler(h)
    log.setLevel(getattr(logging, level))
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
    from . import persist

    persist.check_target(args.output, overwrite=True)   # (a Hadoop-FS one, now Spark is up)
    df = read_data(spark, args)
    if args.partitions:
        df = df.repartition(args.partitions)
    _setup_logging(args.log_level)
    started = time.perf_counter()
    model = estimator.fit(df)
    s = model.summary
    print(f"sparkgd: done: {s.totalIterations} iterations, objective "
          f"{s.objectiveHistory[-1]:.12g}, {s.trainingSeconds:.2f}s training, "
          f"{time.perf_counter() - started:.2f}s with data preparation, "
          f"{s.bytesCommunicated} bytes communicated, {s.driverBytes} of them through the "
          f"driver ({s.message})")
    if s.privacy:
        p = s.privacy
        print(f"sparkgd: privacy: epsilon {p['epsilon']:.4g} at delta {p['delta']:g} "
              f"({p['accountant']}): {p['steps']} steps, sampling rate {p['samplingRate']:g}, "
              f"noise multiplier {p['noiseMultiplier']:.4g}, clip {p['maxGradNorm']:g}")
    model.save(args.output, overwrite=True)
    print(f"sparkgd: model ({model.numFeatures} features) saved to {args.output}")
    print("sparkgd: training metrics: " + _metrics_line(model))
    if args.plot:
        s.plot(args.plot)
        print(f"sparkgd: plot written to {args.plot}")
    return model


def _metrics_line(model):
    """Spark ML's names for the training data's metrics (one pass)."""
    s = model.summary
    if s._evaluated() is None:
        return "not computed: " + s.__dict__.get("_no_metrics", "no metrics")
    if model.lossName in ("squared", "huber"):
        pairs = [("r2", s.r2), ("rootMeanSquaredError", s.rootMeanSquaredError),
                 ("meanAbsoluteError", s.meanAbsoluteError)]
    else:
        pairs = [("accuracy", s.accuracy), ("weightedFMeasure", s.weightedFMeasure())]
        if model.numClasses == 2 and model.coefficients.ndim == 1:
            pairs.insert(0, ("areaUnderROC", s.areaUnderROC))
        if s.logLoss is not None:
            pairs.append(("logLoss", s.logLoss))
    return ", ".join(f"{k} {v:.6g}" for k, v in pairs)


def main(argv=None, default_data=None):
    try:
        args = build_parser(default_data).parse_args(argv)
        run(args)
    except SparkgdError as e:
        msg = " ".join(str(e).split())
        print(f"sparkgd: error: {msg}", file=sys.stderr)
        return 2
    except Exception as e:   # a dead JVM is not a bug of ours: say what it is, once
        from .errors import JVM_GONE, jvm_gone

        if not jvm_gone(e):
            raise
        print(f"sparkgd: error: {JVM_GONE}", file=sys.stderr)
        return 2
    return 0


# --------------------------------------------------------------------------- jobs/predict.py


def build_predict_parser():
    p = _Parser(prog="jobs/predict.py",
                description="Score a dataset with a saved sparkgd model; write Parquet.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True,
                   help="a saved model directory (local path or Hadoop-FS URI)")
    p.add_argument("--data", required=True, help="Parquet file or directory to score")
    p.add_argument("--format", default="parquet", choices=["parquet", "libsvm"],
                   help="input format")
    p.add_argument("--num-features", type=_int, default=None,
                   help="libsvm: number of features (default: the model's)")
    p.add_argument("--features-col", default=None,
                   help="features column (default: the one the model was trained with)")
    p.add_argument("--feature-cols", type=_column_list, default=None,
                   help="comma-separated numeric columns to use as features instead")
    p.add_argument("--output", required=True,
                   help="Parquet directory for the input's columns plus prediction (and "
                        "rawPrediction, probability as arrays); must not exist yet")
    return p


def predict(args):
    """Score ``args.data`` with the model at ``args.model``; write ``args.output``
    beside-then-rename (atomic where the file system renames atomically)."""
    from pyspark.ml.functions import vector_to_array
    from pyspark.sql import SparkSession

    from . import estimators, persist

    if _is_local(args.data) and not os.path.exists(_strip_file(args.data)):
        raise SparkgdError(f"--data '{args.data}': no such file or directory")
    if _is_local(args.model) and not os.path.isfile(
            os.path.join(_strip_file(args.model), "metadata.json")):
        raise SparkgdError(f"--model '{args.model}': not a saved sparkgd model (no "
                           "metadata.json there)")
    spark = SparkSession.builder.appName("sparkgd-predict").getOrCreate()
    fs, target = persist.filesystem(args.output)
    if fs.exists(target):
        raise SparkgdError(f"--output '{args.output}' already exists; refusing to replace it")
    model = estimators.load_model(args.model)
    if args.features_col:
        model.setFeaturesCol(args.features_col)
    if args.feature_cols:
        model.setFeatureCols(args.feature_cols)
    if args.format == "libsvm" and args.num_features is None:
        args.num_features = model.numFeatures
    args.weight_col = None
    df = read_data(spark, args)
    scratch = fs.temp_dir_beside(target)
    try:
        scored = model.transform(df)
        for col in ("rawPrediction", "probability"):
            name = model.getOrDefault(col + "Col") if model.hasParam(col + "Col") else None
            if name and name in scored.columns:   # arrays: readable by any Parquet reader
                scored = scored.withColumn(name, vector_to_array(scored[name]))
        tmp = fs.join(scratch, "scored")
        try:
            scored.write.parquet(tmp)
        except Exception as e:
            raise SparkgdError(f"cannot score --data '{args.data}': {first_line(e)}") \
                from None
        fs.rename(tmp, target)
    finally:
        fs.delete(scratch)
    rows = spark.read.parquet(args.output).count()
    print(f"sparkgd: {rows} rows scored with {args.model} -> {args.output}")


def predict_main(argv=None):
    try:
        predict(build_predict_parser().parse_args(argv))
    except SparkgdError as e:
        print(f"sparkgd: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0
