"""Scoring a DataFrame: the raw margin column, computed on executors through Arrow.

One Arrow UDF turns the features (any of the input kinds a fit accepts, LIBSVM text
from :func:`sparkgd.read_libsvm` included) into the same NumPy block the kernels use,
then ``X @ coef.T + intercept``. Models
build the rest (probability, prediction) from that column in Spark SQL.
"""

import numpy as np

from . import data, kernels


def margin_column(dataset, model, coef, intercept):
    """A Column: the margin (double) when K == 1, else array<double> of K margins (null
    for the blank and comment lines of LIBSVM text)."""
    import pyarrow as pa
    from pyspark.sql import functions as F
    from pyspark.sql.functions import arrow_udf

    spec = data.resolve_input(dataset.schema, model.getFeaturesCol(), model.getFeatureCols(),
                              label_col=None, weight_col=None)
    if spec.kind == "libsvm":
        col, kind = F.col(data.schema._quote(spec.features[0])), "libsvm"
    else:
        col, kind = data.features_column(dataset, spec)
    d = coef.shape[1]
    coef = np.array(coef, dtype=np.float64)
    intercept = np.array(intercept, dtype=np.float64)
    k = coef.shape[0]
    what = spec.feature_desc

    def features(v):
        """-> (X, the input row of each row of X, or None when they are the same)."""
        if kind != "libsvm":
            return data.features_from_arrow(v, kind, what), None
        from .data.libsvm import LibsvmError, parse_lines, to_csr

        try:
            parsed = parse_lines(v)
            return to_csr(parsed, d), parsed.line_of_row
        except LibsvmError as e:
            raise ValueError(f"sparkgd: {what}, line {e.line + 1} of a batch of {len(v)}: "
                             f"{e} (the model has {d} features)") from None

    def score(v: pa.Array) -> pa.Array:
        X, rows = features(v)
        if X.shape[0] and X.shape[1] != d:
            raise ValueError(f"sparkgd: {what} has {X.shape[1]} features; the model has {d}")
        z = kernels.margins(X, coef, intercept) if X.shape[0] else np.zeros((0, k))
        valid = None
        if rows is not None:       # LIBSVM: skipped lines score null
            full = np.zeros((len(v), k))
            full[rows] = z
            z = full
            valid = np.zeros(len(v), dtype=bool)
            valid[rows] = True
        if k == 1:
            return pa.array(z[:, 0], type=pa.float64(),
                            mask=None if valid is None else ~valid)
        offsets = pa.array(np.arange(0, z.size + 1, k, dtype=np.int32))
        return pa.ListArray.from_arrays(offsets, pa.array(z.ravel()),
                                        mask=None if valid is None else pa.array(~valid))

    return_type = "double" if k == 1 else "array<double>"
    return arrow_udf(score, return_type)(col)
