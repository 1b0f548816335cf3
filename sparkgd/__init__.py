"""sparkgd: distributed gradient descent for linear models on Apache Spark.

The estimators and ``load_model`` are imported on first use (PEP 562): executors
import ``sparkgd.data``, ``sparkgd.engine`` or ``sparkgd.kernels`` for every new
Python worker, and the estimators' imports (pyspark.ml, pandas) cost each worker
about 0.4 s they never use.
"""

__version__ = "0.1.0"

from .errors import SparkgdError  # noqa: E402

_LAZY = {
    "LinearRegression": "estimators",
    "LinearRegressionModel": "estimators",
    "LinearSVC": "estimators",
    "LinearSVCModel": "estimators",
    "LogisticRegression": "estimators",
    "LogisticRegressionModel": "estimators",
    "load_model": "estimators",
    "read_libsvm": "data",
}

__all__ = sorted([*_LAZY, "SparkgdError"])


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sparkgd' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
