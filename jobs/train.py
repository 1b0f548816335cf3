"""spark-submit entry point: ./spark-submit.sh jobs/train.py [job options]

Thin on purpose: everything lives in sparkgd.cli. With no options it trains a
logistic model on the bundled data/sample and saves it to out/model.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLE = os.path.join(os.path.dirname(HERE), "data", "sample")

if __name__ == "__main__":
    from sparkgd.cli import main

    sys.exit(main(sys.argv[1:], default_data=SAMPLE if os.path.isdir(SAMPLE) else None))
