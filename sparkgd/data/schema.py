"""Driver side of reading input: check the schema, decide how executors read each column.

:func:`resolve_input` checks the columns a fit needs and returns an :class:`InputSpec`;
:func:`project` selects them under fixed names (features first, then ``label``, then
``weight``), in the form Arrow moves fastest. Errors say which column and what was
expected. :func:`read_libsvm` marks a text column for the LIBSVM reader. Nothing here
runs on executors.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import SparkgdError


@dataclass(frozen=True)
class InputSpec:
    """How the driver asked executors to read the projected columns.

    The projection has the feature column(s) first, then ``label``, then
    ``weight`` when there is one, all under fixed names.
    """

    kind: str  # "array" | "vector" | "columns" | "libsvm" (text lines, label in the line)
    features: tuple  # original column name(s), for messages
    label: str
    weight: str | None
    num_features: int | None = None  # libsvm: the width given (else the largest index)

    @property
    def feature_desc(self):
        if self.kind == "libsvm":
            return "LIBSVM data"
        if self.kind == "columns":
            return "feature columns " + ",".join(self.features)
        return f"column '{self.features[0]}'"


# ----------------------------------------------------------------------------
# Schema checks and the projection.
# ----------------------------------------------------------------------------


def _is_numeric(dtype):
    from pyspark.sql.types import NumericType

    return isinstance(dtype, NumericType)


def _type_name(dtype):
    try:
        return dtype.simpleString()
    except Exception:  # pragma: no cover
        return str(dtype)


def _field(schema, name, role, source):
    names = schema.fieldNames()
    if name not in names:
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise SparkgdError(f"{role} column '{name}' not found in {source} (columns: {shown})")
    return schema[name]


def resolve_input(schema, features_col="features", feature_cols=None, label_col="label",
                  weight_col=None, source="the DataFrame"):
    """Check the columns a fit needs; return an :class:`InputSpec`."""
    from pyspark.ml.linalg import VectorUDT
    from pyspark.sql.types import ArrayType, DoubleType, FloatType

    if feature_cols:
        for c in feature_cols:
            f = _field(schema, c, "feature", source)
            if not _is_numeric(f.dataType):
                raise SparkgdError(
                    f"feature column '{c}' in {source} has type {_type_name(f.dataType)}; "
                    "expected a numeric type")
        kind, features = "columns", tuple(feature_cols)
    else:
        f = _field(schema, features_col, "features", source)
        t = f.dataType
        libsvm = (f.metadata or {}).get(LIBSVM_METADATA)
        if libsvm is not None:
            # text lines from read_libsvm: the label is in the line, there are no weights
            return InputSpec("libsvm", (features_col,), "label", None,
                             libsvm.get("numFeatures"))
        if isinstance(t, VectorUDT):
            kind = "vector"
        elif isinstance(t, ArrayType) and isinstance(t.elementType, (DoubleType, FloatType)):
            kind = "array"
        else:
            raise SparkgdError(
                f"features column '{features_col}' in {source} has type {_type_name(t)}; "
                "expected array<double>, array<float> or a Spark ML vector "
                "(or name numeric columns with --feature-cols)")
        features = (features_col,)
    for role, name in (("label", label_col), ("weight", weight_col)):
        if name is None:
            continue
        f = _field(schema, name, role, source)
        if not _is_numeric(f.dataType):
            raise SparkgdError(
                f"{role} column '{name}' in {source} has type {_type_name(f.dataType)}; "
                "expected a numeric type")
    return InputSpec(kind, features, label_col, weight_col)


#: Dense vector columns up to this many features are converted to arrays in the
#: JVM (``vector_to_array``), which moves them to Arrow 2-5x faster than the
#: vector type's own row-by-row conversion. Sparse or wider vectors keep their
#: struct form and become CSR blocks.
VECTOR_AS_ARRAY_MAX = 4096


def _first_vector(df, name):
    """The first non-null vector of a column (None when there is none)."""
    from pyspark.sql import functions as F

    row = df.select(F.col(_quote(name))).where(F.col(_quote(name)).isNotNull()).head()
    return None if row is None else row[0]


def features_column(df, spec):
    """-> (Column, executor kind): the features as executors read them."""
    from pyspark.sql import functions as F

    if spec.kind == "columns":
        return F.array(*[F.col(_quote(c)).cast("double") for c in spec.features]), "array"
    col = F.col(_quote(spec.features[0]))
    if spec.kind == "array":
        return col.cast("array<double>"), "array"
    from pyspark.ml.linalg import DenseVector

    first = _first_vector(df, spec.features[0])
    if isinstance(first, DenseVector) and first.size <= VECTOR_AS_ARRAY_MAX:
        from pyspark.ml.functions import vector_to_array

        return vector_to_array(col, "float64"), "array"
    return col, "vector"


def project(df, spec):
    """The columns executors read, and the spec they read them with.

    Numeric feature columns stay separate columns (cheapest to move); array and
    narrow vector columns arrive as ``array<double>``; wide vectors as the
    vector struct (dense or sparse rows).
    """
    from dataclasses import replace

    from pyspark.sql import functions as F

    if spec.kind == "libsvm":
        return df.select(F.col(_quote(spec.features[0])).alias("features"),
                         F.col(LIBSVM_FILE), F.col(LIBSVM_START)), spec
    if spec.kind == "columns":
        cols = [F.col(_quote(c)).cast("double").alias(f"f{i}")
                for i, c in enumerate(spec.features)]
        read_spec = spec
    else:
        col, kind = features_column(df, spec)
        cols = [col.alias("features")]
        read_spec = replace(spec, kind=kind)
    cols.append(F.col(_quote(spec.label)).cast("double").alias("label"))
    if spec.weight is not None:
        cols.append(F.col(_quote(spec.weight)).cast("double").alias("weight"))
    return df.select(*cols), read_spec


def _quote(name):
    return "`" + name.replace("`", "``") + "`"


#: The column metadata key that marks the text column of :func:`read_libsvm`.
LIBSVM_METADATA = "sparkgd.libsvm"


LIBSVM_FILE, LIBSVM_START = "_sparkgd_file", "_sparkgd_start"


def read_libsvm(spark, path, num_features=None, features_col="features"):
    """LIBSVM text as a DataFrame the estimators read: one row per line (the text column
    ``features_col``, marked in its metadata, plus the file and split it came from).

    Nothing is parsed here, and no pass counts the features: the tasks that build the
    blocks parse the lines with :mod:`sparkgd.libsvm` (Arrow and NumPy, no JVM vectors),
    and the width is the largest index found (or ``num_features``). Spark's own
    ``format("libsvm")`` builds a vector object per row in the JVM (~820 bytes per
    non-zero) and needs a counting pass without ``numFeatures``."""
    from pyspark.sql import functions as F

    if num_features is not None and int(num_features) < 1:
        raise SparkgdError(f"numFeatures must be >= 1 (got {num_features})")
    meta = {LIBSVM_METADATA: {"numFeatures": None if num_features is None
                              else int(num_features)}}
    text = spark.read.text(path)
    return text.select(F.col("value").alias(features_col, metadata=meta),
                       F.col("_metadata.file_path").alias(LIBSVM_FILE),
                       F.col("_metadata.file_block_start").alias(LIBSVM_START))
