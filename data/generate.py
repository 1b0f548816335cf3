#!/usr/bin/env python3
"""Generate a synthetic Parquet data set: a thin wrapper around ``sparkgd.datagen``.

    python data/generate.py OUT [--task binary|regression|multiclass] [--rows N]
                                [--features D] [--partitions P] [--classes K] [--seed S]
                                [--format array|columns|libsvm] [--nnz-per-row K]
                                [--weights] [--overwrite]

Needs only numpy and pyarrow. The generator module is loaded from its file, so neither an
installed sparkgd nor Spark is required.
"""
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_DATAGEN = os.path.join(_HERE, os.pardir, "sparkgd", "datagen.py")


def _load_datagen():
    spec = importlib.util.spec_from_file_location("sparkgd_datagen", os.path.normpath(_DATAGEN))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    datagen = _load_datagen()
    sys.exit(datagen.main(sys.argv[1:], prog="python data/generate.py"))
