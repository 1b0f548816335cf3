"""Scoring a DataFrame: the raw margin column, computed on executors through Arrow.

One Arrow UDF turns the features (any of the input kinds a fit accepts) into
the same NumPy block the kernels use, then ``X @ coef.T + intercept``. Models
build the rest (probability, prediction) from that column in Spark SQL.
"""

import numpy as np

from . import data, kernels


def margin_column(dataset, model, coef, intercept):
    """A Column: the margin (double) when K == 1, else array<double> of K margins."""
    import pyarrow as pa
    from pyspark.sql.functions import arrow_udf

    spec = data.resolve_input(dataset.schema, model.getFeaturesCol(), model.getFeatureCols(),
                              label_col=None, weight_col=None)
    col, kind = data.features_column(dataset, spec)
    d = coef.shape[1]
    coef = np.array(coef, dtype=np.float64)
    intercept = np.array(intercept, dtype=np.float64)
    k = coef.shape[0]
    what = spec.feature_desc

    def score(v: pa.Array) -> pa.Array:
        X = data.features_from_arrow(v, kind, what)
        if X.shape[0] and X.shape[1] != d:
            raise ValueError(f"sparkgd: {what} has {X.shape[1]} features; the model has {d}")
        if X.shape[0] == 0:
            z = np.zeros((0, k))
        else:
            z = kernels.margins(X, coef, intercept)
        if k == 1:
            return pa.array(z[:, 0], type=pa.float64())
        offsets = np.arange(0, z.size + 1, k, dtype=np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(z.ravel()))

    return_type = "double" if k == 1 else "array<double>"
    return arrow_udf(score, return_type)(col)
