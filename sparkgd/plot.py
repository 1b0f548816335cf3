"""A training summary as a picture: one PNG, three panels side by side.

1. ``F - F_min`` against iteration, log scale (``F_min`` is the smallest F in the
   history and is printed in the axis label);
2. the same against seconds since the start of training (``objectiveTimes``);
3. bytes communicated per iteration: the first difference of the cumulative
   ``bytesHistory`` (the first entry as is), or, for a summary without it, a flat
   line at the average ``bytesCommunicated / totalIterations``.

The points where ``F == F_min`` exactly have no place on a log scale: they are
drawn as markers on the panel's lower edge instead. A summary whose objectives
are all equal (or that has one) says so in words. matplotlib is an optional
extra (``pip install 'sparkgd[plot]'``); it is imported only here, and only the
object-oriented API is used (a ``Figure`` on an Agg canvas): pyplot's figures and
the session's backend (a notebook's, say) are left as they are.
"""
from __future__ import annotations

import math
import os
import textwrap

from .errors import SparkgdError

#: The picture's size in pixels (width, height) and its resolution.
SIZE_PX = (1650, 520)
DPI = 110

MISSING_MATPLOTLIB = ("plotting needs matplotlib: pip install 'sparkgd[plot]' "
                      "(or pip install matplotlib)")

#: Decimal byte units, as the rest of sparkgd prints them (``/ 1e6`` is MB).
_UNITS = (("B", 1.0), ("KB", 1e3), ("MB", 1e6), ("GB", 1e9), ("TB", 1e12), ("PB", 1e15))

_LINE = "#1f5fa8"
_AT_MIN = "#c0392b"
_BYTES = "#5a8f3d"


def plot_summary(summary, path, title=None):
    """Write a PNG of ``summary`` (a :class:`~sparkgd.summary.TrainingSummary`) to ``path``.

    ``path`` is a local file name ending in ``.png`` (``file://`` is accepted); the
    picture is written beside it and renamed into place, so a reader never sees half
    of it. ``title`` (optional) is put above the line the summary's facts make (mode,
    iterations, training seconds, converged or not and why). Returns the absolute path.
    Raises :class:`~sparkgd.errors.SparkgdError` for a path not ending in ``.png``, a
    directory that does not exist, a file that cannot be written, or no matplotlib.
    """
    target = _target(path)
    fig = summary_figure(summary, title)
    return _write_png(fig, target)


def summary_figure(summary, title=None):
    """-> the plot of ``summary`` as a matplotlib ``Figure`` on an Agg canvas (not one
    pyplot knows of); :func:`plot_summary` writes it. Raises
    :class:`~sparkgd.errors.SparkgdError` when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise SparkgdError(MISSING_MATPLOTLIB) from e

    fig = Figure(figsize=(SIZE_PX[0] / DPI, SIZE_PX[1] / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax_it, ax_time, ax_bytes = fig.subplots(1, 3)

    history = _floats(getattr(summary, "objectiveHistory", None))
    iterations = int(getattr(summary, "totalIterations", 0) or 0)
    x_it = _iteration_numbers(len(history), iterations)
    gap, f_min = _gaps(history)

    _integer_ticks(ax_it)
    _objective_panel(ax_it, x_it, gap, f_min, history)
    ax_it.set_xlabel("iteration")
    ax_it.set_title("objective by iteration")

    times = _floats(getattr(summary, "objectiveTimes", None))
    ax_time.set_title("objective by time")
    ax_time.set_xlabel("seconds since the start of training")
    timed = [(t, g, f) for t, g, f in zip(times, gap, history) if t is not None]
    if not history:
        _note(ax_time, "no objective history")
    elif not timed:
        _note(ax_time, "no timings\n(this summary has no objectiveTimes)")
    else:
        xs, gs, fs = (list(c) for c in zip(*timed))
        _objective_panel(ax_time, xs, gs, f_min, fs)

    _bytes_panel(ax_bytes, summary, x_it, iterations)

    fig.suptitle(_headline(summary, iterations, title), fontsize=12)
    return fig


# -- the panels ------------------------------------------------------------------------

def _objective_panel(ax, x, gap, f_min, history):
    """``gap = F - F_min`` against ``x`` on a log scale; F == F_min on the lower edge."""
    if not history:
        _note(ax, "no objective history")
        return
    finite = [g for g in gap if g is not None]
    if not finite:
        _note(ax, "no finite objective")
        return
    positive = [g for g in finite if g > 0]
    if not positive:
        n = len(history)
        what = "one objective value" if n == 1 else f"all {n} objective values equal"
        _note(ax, f"{what}:\nF = {_g(f_min)}", keep_x=len(set(x)) > 1)
        if len(set(x)) > 1:
            ax.set_xlim(min(x), max(x))
        return
    ys = [math.log10(g) if g is not None and g > 0 else math.nan for g in gap]
    lo, hi = _log_limits(math.log10(min(positive)), math.log10(max(positive)))
    if -290 < lo and hi < 290:
        ax.plot(x, [10.0 ** y for y in ys], color=_LINE, lw=1.6,
                marker="o" if len(x) <= 60 else None, ms=3.5, label="F − F_min")
        ax.set_yscale("log")
        ax.set_ylim(10.0 ** lo, 10.0 ** hi)
    else:
        # matplotlib's log scale overflows near the ends of the doubles' range: the
        # exponents on a linear axis, labelled as powers of ten, read the same
        from matplotlib.ticker import FuncFormatter, MaxNLocator

        ax.plot(x, ys, color=_LINE, lw=1.6, marker="o" if len(x) <= 60 else None, ms=3.5,
                label="F − F_min")
        ax.set_ylim(lo, hi)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"$10^{{{v:.0f}}}$"))
    at_min = [xi for xi, g in zip(x, gap) if g == 0]
    if at_min:
        # a log scale has no 0: mark where F == F_min just above the axis' lower edge
        ax.plot(at_min, [0.03] * len(at_min), linestyle="none", marker="v", ms=8,
                color=_AT_MIN, clip_on=False, transform=ax.get_xaxis_transform(),
                label="F = F_min", zorder=5)
    ax.set_ylabel(f"F − F_min   (F_min = {_g(f_min)})")
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", axis="y", alpha=0.12)
    ax.legend(loc="upper right", fontsize=9, framealpha=0.85)


def _bytes_panel(ax, summary, x_it, iterations):
    ax.set_title("bytes communicated per iteration")
    ax.set_xlabel("iteration")
    _integer_ticks(ax)
    cumulative = _floats(getattr(summary, "bytesHistory", None))
    total = float(getattr(summary, "bytesCommunicated", 0) or 0)
    driver = float(getattr(summary, "driverBytes", 0) or 0)
    per = None
    if cumulative and all(c is not None for c in cumulative):
        per = [cumulative[0]] + [b - a for a, b in zip(cumulative, cumulative[1:])]
        x = _iteration_numbers(len(per), iterations) if len(per) != len(x_it) else x_it
        scale = _unit(max(abs(v) for v in per))
        if len(per) <= 120:
            ax.bar(x, per, width=0.8, color=_BYTES, alpha=0.85, label="per iteration")
        else:
            ax.fill_between(x, per, step="mid", color=_BYTES, alpha=0.35, lw=0)
            ax.step(x, per, where="mid", color=_BYTES, lw=1.0, label="per iteration")
        mean = (cumulative[-1]) / max(1, len(per))
        ax.axhline(mean, color="0.25", lw=1.0, ls="--", label=f"mean {_human(mean)}")
        total = total or cumulative[-1]
    elif total > 0:
        mean = total / max(1, iterations)
        scale = _unit(mean)
        xs = [min(x_it), max(x_it)] if x_it else [0, max(1, iterations)]
        if xs[0] == xs[1]:
            xs = [xs[0] - 0.5, xs[0] + 0.5]
        ax.plot(xs, [mean, mean], color=_BYTES, lw=2.0,
                label=f"average {_human(mean)} (no per-iteration bytes)")
        ax.set_xlim(xs)
    else:
        _note(ax, "no per-iteration bytes")
        return
    top = max(per) if per is not None else mean
    ax.set_ylim(min(0.0, ax.get_ylim()[0]), top * 1.3 if top > 0 else 1.0)   # legend room
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: _tick(v, scale)))
    ax.set_ylabel("bytes")
    ax.grid(True, axis="y", alpha=0.35)
    what = f"total {_human(total)}"
    if driver:
        what += f", {_human(driver)} through the driver"
    ax.legend(loc="upper right", fontsize=9, framealpha=0.85, title=what,
              title_fontsize=9)


# -- helpers ---------------------------------------------------------------------------

def _target(path):
    """-> the absolute local path, or SparkgdError."""
    try:
        path = os.fspath(path)
    except TypeError:
        raise SparkgdError(f"plot path {path!r}: expected a file name ending in .png") from None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if path.startswith("file://"):
        path = path[len("file://"):]
    elif "://" in path:
        raise SparkgdError(f"plot path '{path}': only local paths are supported")
    if not path.lower().endswith(".png"):
        raise SparkgdError(f"plot path '{path}': must end in .png (the plot is a PNG)")
    target = os.path.abspath(os.path.expanduser(path))
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        raise SparkgdError(f"plot path '{path}': directory '{parent}' does not exist")
    if os.path.isdir(target):
        raise SparkgdError(f"plot path '{path}': is a directory")
    return target


def _write_png(fig, target):
    """The PNG to a file beside ``target`` (fsynced), then renamed onto it."""
    parent, name = os.path.split(target)
    tmp = os.path.join(parent, f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        with open(tmp, "xb") as f:
            fig.canvas.print_png(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as e:
        raise SparkgdError(f"plot path '{target}': cannot write it: {e.strerror or e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _floats(values):
    """-> a list of floats, None for entries that are not finite numbers."""
    out = []
    for v in values or ():
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = math.nan
        out.append(f if math.isfinite(f) else None)
    return out


def _gaps(history):
    """-> ([F - F_min or None], F_min) over the finite entries."""
    finite = [f for f in history if f is not None]
    if not finite:
        return [None] * len(history), math.nan
    f_min = min(finite)
    gaps = []
    for f in history:
        g = None if f is None else f - f_min
        gaps.append(g if g is not None and math.isfinite(g) else None)
    return gaps, f_min


def _iteration_numbers(n, iterations):
    """Entry k is F after iteration k + 1; a history one longer than the iterations
    starts at the initial point (iteration 0)."""
    first = 0 if n == iterations + 1 else 1
    return list(range(first, first + n))


def _log_limits(a, b):
    """log10 y limits for values from ``10**a`` to ``10**b``: 5 % of the decades either
    side, at least 1.5 decades in all (a log scale shows nothing in less)."""
    if b - a < 1.5:
        mid = (a + b) / 2
        return mid - 0.75, mid + 0.75
    pad = 0.05 * (b - a)
    return a - pad, b + pad


def _integer_ticks(ax):
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))


def _note(ax, text, keep_x=False):
    """Words instead of a curve, in the middle of the panel (no ticks that mean nothing)."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center",
            fontsize=11, color="0.35", wrap=True)
    ax.set_yticks([])
    if not keep_x:
        ax.set_xticks([])


def _headline(summary, iterations, title):
    mode = getattr(summary, "mode", None) or "sync"
    seconds = float(getattr(summary, "trainingSeconds", 0.0) or 0.0)
    converged = bool(getattr(summary, "converged", False))
    message = " ".join(str(getattr(summary, "message", "") or "").split())
    facts = (f"mode {mode}  ·  {iterations} iteration{'s' if iterations != 1 else ''}  ·  "
             f"{_seconds(seconds)} training  ·  "
             f"{'converged' if converged else 'not converged'}")
    if message:
        facts += f": {textwrap.shorten(message, 90, placeholder=' …')}"
    return f"{title}\n{facts}" if title else facts


def _seconds(s):
    if s >= 3600:
        return f"{s:,.0f} s ({s / 3600:.3g} h)"
    return f"{s:.3g} s" if s < 100 else f"{s:,.0f} s"


def _unit(value):
    """-> (name, divisor): the largest unit that keeps ``value`` at 1 or more."""
    chosen = _UNITS[0]
    for unit in _UNITS:
        if abs(value) >= unit[1]:
            chosen = unit
    return chosen


def _human(value):
    """``684 KB``: three significant digits in the smallest unit that keeps them
    below 1000 (999,600 bytes is ``1 MB``, not ``1e+03 KB``)."""
    for name, div in _UNITS:
        v = value / div
        if abs(v) < 999.5 or name == _UNITS[-1][0]:
            return f"{v:.0f} {name}" if name == "B" else f"{v:.3g} {name}"


def _tick(value, scale):
    name, div = scale
    v = value / div
    text = f"{v:.6g}"
    return "0" if v == 0 else f"{text} {name}"


def _g(value):
    return f"{value:.10g}"
