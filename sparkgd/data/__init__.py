"""Input: DataFrame / Parquet / LIBSVM text -> NumPy blocks and their facts.

* :mod:`~sparkgd.data.schema` (driver): check the columns, project them for Arrow;
* :mod:`~sparkgd.data.arrow` (executors, pure): Arrow batches -> ``(X, y, w)``;
* :mod:`~sparkgd.data.libsvm` (executors, pure): LIBSVM lines -> CSR;
* :mod:`~sparkgd.data.facts` (both): rows, labels, weights, moments, and how they merge.

Where the blocks then live, and how passes reach them, is the engine's business
(:mod:`sparkgd.engine`): nothing here imports it.
"""
from .arrow import DTYPES, BadInput, features_from_arrow
from .schema import InputSpec, features_column, project, read_libsvm, resolve_input

__all__ = ["DTYPES", "BadInput", "InputSpec", "features_column", "features_from_arrow",
           "project", "read_libsvm", "resolve_input"]
