"""spark-submit entry point: ./spark-submit.sh jobs/predict.py --model DIR --data PATH --output DIR

Scores a dataset with a model saved by jobs/train.py (or ``model.save``) and writes
the input's columns plus the prediction columns as Parquet. Thin on purpose:
everything lives in sparkgd.cli.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train import _restore_stderr  # noqa: E402  (the same stderr handling as train.py)

if __name__ == "__main__":
    _restore_stderr()
    from sparkgd.cli import predict_main

    sys.exit(predict_main(sys.argv[1:]))
