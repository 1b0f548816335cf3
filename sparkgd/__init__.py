"""sparkgd: distributed gradient descent for linear models on Apache Spark."""

__version__ = "0.1.0"

from .errors import SparkgdError  # noqa: E402
from .estimators import (  # noqa: E402
    LinearRegression,
    LinearRegressionModel,
    LinearSVC,
    LinearSVCModel,
    LogisticRegression,
    LogisticRegressionModel,
)
from .persist import load_model  # noqa: E402

__all__ = [
    "LinearRegression",
    "LinearRegressionModel",
    "LinearSVC",
    "LinearSVCModel",
    "LogisticRegression",
    "LogisticRegressionModel",
    "SparkgdError",
    "load_model",
]
