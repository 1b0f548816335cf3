"""The one exception type users see for bad usage or bad input."""
import re


class SparkgdError(ValueError):
    """Bad usage or bad input. The message says what and where, in one line.

    The command line prints it as ``sparkgd: error: <message>`` and exits 2.
    """


_MISSING = re.compile(r"(?:ModuleNotFoundError|ImportError): No module named '([\w.]+)'")
_PY_ERROR = re.compile(r"^\s*(\w+(?:Error|Exception)): (.+)$", re.M)


#: What a call into Spark's JVM says when the JVM is gone (killed, or out of memory:
#: Spark exits the JVM on an OutOfMemoryError in any of its threads).
_JVM_GONE = re.compile(r"Py4JNetworkError|Answer from Java side is empty|"
                       r"Error while sending or receiving|java\.lang\.OutOfMemoryError|"
                       r"Java heap space")
JVM_GONE = ("Spark's JVM died (out of memory? \"Java heap space\" is the usual cause, with "
            "wide rows or many tasks at once: raise --driver-memory -- in local mode it is "
            "the executors' memory too -- or spark.executor.memory on a cluster, or lower "
            "spark.sql.parquet.columnarReaderBatchSize); the JVM's own log says why")


def jvm_gone(e):
    """Whether ``e`` says Spark's JVM died (see :data:`JVM_GONE`)."""
    return isinstance(e, ConnectionRefusedError) or type(e).__name__ == "Py4JNetworkError" \
        or bool(_JVM_GONE.search(str(e)))


def first_line(e):
    """One line saying what went wrong in ``e`` -- a Spark exception included, whose
    first line is often only "An exception was thrown from the Python worker:" with the
    cause further down. A module missing on the executors names the module and the fix;
    a JVM that died says so, and what to raise."""
    text = str(e).strip()
    if jvm_gone(e):
        return JVM_GONE
    missing = _MISSING.search(text)
    if missing:
        return (f"the Python running Spark's tasks has no module '{missing.group(1)}': set "
                "PYSPARK_PYTHON (or spark.pyspark.python) to an interpreter with sparkgd's "
                "dependencies installed, on every executor (./spark-submit.sh does this "
                "for local runs; on a cluster ship a packed environment, see README)")
    lines = text.splitlines()
    first = lines[0].strip() if lines else type(e).__name__
    if first.rstrip(":").endswith("thrown from the Python worker") or first.endswith(":"):
        causes = _PY_ERROR.findall(text)
        if causes:
            kind, what = causes[-1]
            return f"{first.rstrip(':')}: {kind}: {what.strip()}"
    return first
