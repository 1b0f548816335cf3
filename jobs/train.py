"""spark-submit entry point: ./spark-submit.sh jobs/train.py [job options]

Thin on purpose: everything lives in sparkgd.cli. With no options it trains a
logistic model on the bundled data/sample and saves it to out/model.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLE = os.path.join(os.path.dirname(HERE), "data", "sample")


def _restore_stderr():
    """spark-submit merges the Python driver's stderr into its stdout; spark-submit.sh
    passes the real stderr as SPARKGD_STDERR so errors land where users look."""
    path = os.environ.get("SPARKGD_STDERR")
    if not path:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    except OSError:
        return
    os.dup2(fd, 2)
    os.close(fd)


if __name__ == "__main__":
    _restore_stderr()
    from sparkgd.cli import main

    sys.exit(main(sys.argv[1:], default_data=SAMPLE if os.path.isdir(SAMPLE) else None))
