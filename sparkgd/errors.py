"""The one exception type users see for bad usage or bad input."""


class SparkgdError(ValueError):
    """Bad usage or bad input. The message says what and where, in one line.

    The command line prints it as ``sparkgd: error: <message>`` and exits 2.
    """
