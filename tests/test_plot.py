"""The training-summary plot: hand-built summaries (no Spark), a PNG of the promised
size, the panels' content, the odd histories, and the errors a user can meet."""
import importlib.util
import math
import os
import struct
import sys
import warnings

import pytest

from sparkgd.errors import SparkgdError
from sparkgd.plot import MISSING_MATPLOTLIB, SIZE_PX, plot_summary, summary_figure
from sparkgd.summary import TrainingSummary

needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib is an optional extra")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
F_MIN = 0.5555364


def lbfgs_like(bytes_history=True):
    """30 iterations from 0.69 down to F_MIN, a decade or so each, with times and
    cumulative bytes (a big first entry, then one or two evaluations' worth)."""
    gap, history = 0.69 - F_MIN, [0.69]
    for k in range(1, 29):
        gap *= 10 ** -(0.35 + 0.25 * ((k * 7) % 5) / 4)
        history.append(F_MIN + gap)
    history.append(F_MIN)
    evals = [2 if k % 4 == 3 else 1 for k in range(30)]
    per = [180_000 + 12_928] + [12_928 * e for e in evals[1:]]
    cumulative, times = [], []
    for k in range(30):
        cumulative.append((cumulative[-1] if cumulative else 0) + per[k])
        times.append(1.4 + 0.12 * sum(evals[:k + 1]))
    s = TrainingSummary(objectiveHistory=history, totalIterations=30,
                        trainingSeconds=times[-1] + 0.05, bytesCommunicated=cumulative[-1],
                        driverBytes=cumulative[-1] // 3, numEvaluations=sum(evals),
                        converged=True,
                        message="CONVERGENCE: REL_REDUCTION_OF_F_<=_FACTR*EPSMCH",
                        objectiveTimes=times, mode="sync")
    if bytes_history:
        s.bytesHistory = cumulative       # the field another change adds to the dataclass
    return s, per


def png_size(path):
    """(width, height) from the IHDR chunk, which follows the signature."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_SIGNATURE
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def texts(fig, ticks=False):
    """The text on the figure: titles, labels, notes, legends (and tick labels, which
    exist only once the figure is drawn)."""
    from matplotlib.text import Text

    if ticks:
        fig.canvas.draw()
    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


@needs_matplotlib
def test_a_realistic_summary_is_a_png_of_the_promised_size(tmp_path):
    import matplotlib.image

    s, _ = lbfgs_like()
    out = plot_summary(s, tmp_path / "fit.png", title="logistic, 101 features")
    assert out == str(tmp_path / "fit.png") and os.path.isabs(out)
    assert png_size(out) == SIZE_PX
    pixels = matplotlib.image.imread(out)
    assert pixels.shape[:2] == (SIZE_PX[1], SIZE_PX[0])
    assert (pixels[..., :3] < 0.5).any()      # something was drawn, not a blank page
    assert os.listdir(tmp_path) == ["fit.png"]   # the temporary file is gone


@needs_matplotlib
def test_the_panels_say_what_the_summary_holds():
    s, per = lbfgs_like()
    fig = summary_figure(s, title="my fit")
    ax_it, ax_time, ax_bytes = fig.axes
    words = "\n".join(texts(fig, ticks=True))
    head = fig.get_suptitle()
    assert head.startswith("my fit\n")
    for part in ("mode sync", "30 iterations", "s training", "converged: CONVERGENCE"):
        assert part in head, part
    assert ax_it.get_yscale() == "log" and ax_time.get_yscale() == "log"
    assert f"F_min = {F_MIN}" in ax_it.get_ylabel()
    # F - F_min on the line; the last entry (F == F_min) is the marker on the lower edge
    line = ax_it.get_lines()[0]
    assert list(line.get_xdata()) == list(range(1, 31))
    y = line.get_ydata()
    assert math.isclose(y[0], 0.69 - F_MIN) and math.isnan(y[-1])
    assert list(ax_it.get_lines()[1].get_xdata()) == [30]
    assert list(ax_time.get_lines()[0].get_xdata()) == s.objectiveTimes
    # bytes per iteration: the first difference of the cumulative counts, in KB
    assert [p.get_height() for p in ax_bytes.patches] == per
    assert sum(per) == 658_336 and "200 KB" in words.split("\n")
    assert "total 658 KB, 219 KB through the driver" in words and "mean 21.9 KB" in words


@needs_matplotlib
def test_an_old_summary_without_times_or_byte_history_still_renders(tmp_path):
    s, _ = lbfgs_like(bytes_history=False)
    s.objectiveTimes = []
    out = plot_summary(s, str(tmp_path / "old.png"))
    assert png_size(out) == SIZE_PX
    fig = summary_figure(s)
    words = "\n".join(texts(fig))
    assert "no timings" in words
    mean = s.bytesCommunicated / s.totalIterations
    (flat,) = fig.axes[2].get_lines()
    assert list(flat.get_ydata()) == [mean, mean]
    assert "average 21.9 KB (no per-iteration bytes)" in words


@needs_matplotlib
def test_no_bytes_at_all_is_said_in_words():
    s = TrainingSummary(objectiveHistory=[1.0, 0.5, 0.25], totalIterations=3)
    assert "no per-iteration bytes" in "\n".join(texts(summary_figure(s)))


@needs_matplotlib
@pytest.mark.parametrize("history, iterations, note", [
    ([0.69], 0, "one objective value"),
    ([0.5] * 6, 6, "all 6 objective values equal"),
    ([], 0, "no objective history"),
])
def test_a_history_with_nothing_to_put_on_a_log_scale(tmp_path, history, iterations, note):
    s = TrainingSummary(objectiveHistory=history, totalIterations=iterations,
                        objectiveTimes=[0.1 * (k + 1) for k in range(len(history))],
                        bytesCommunicated=1000 * iterations)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert png_size(plot_summary(s, tmp_path / "flat.png")) == SIZE_PX
        assert note in "\n".join(texts(summary_figure(s)))


@needs_matplotlib
@pytest.mark.parametrize("history", [
    [1e300 * 10.0 ** (-12 * k) for k in range(50)] + [-1e10],   # 600 decades
    [1e-300, 1e-310, 0.0],                                        # down to subnormals
    [0.5 + 1e-9, 0.5 + 5e-10, 0.5],                               # less than a decade
    [1.0, 2.0, 1.0 - 1e-16, 1.5, 1.0 - 1e-16],                    # not monotone, two minima
])
def test_odd_ranges_render_without_overflow(tmp_path, history):
    n = len(history)
    s = TrainingSummary(objectiveHistory=history, totalIterations=n, mode="async",
                        objectiveTimes=[600.0 * k for k in range(n)],
                        bytesCommunicated=5 * 10 ** 12, trainingSeconds=3e4)
    s.bytesHistory = [10 ** 11 * (k + 1) for k in range(n)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")    # numpy's overflow warnings included
        assert png_size(plot_summary(s, tmp_path / "odd.png")) == SIZE_PX


@needs_matplotlib
def test_a_long_history_and_an_existing_file_replaced(tmp_path):
    n = 8000
    s = TrainingSummary(objectiveHistory=[0.3 + 0.7 * math.exp(-k / 900) for k in range(n)],
                        totalIterations=n, objectiveTimes=[0.1 * k for k in range(n)],
                        mode="local")
    s.bytesHistory = [4000 * (k + 1) for k in range(n)]
    target = tmp_path / "long.png"
    target.write_bytes(b"old")
    plot_summary(s, target)
    assert png_size(target) == SIZE_PX
    assert os.listdir(tmp_path) == ["long.png"]


def test_byte_counts_read_in_human_units():
    from sparkgd.plot import _human, _tick, _unit

    assert [_human(v) for v in (0, 999, 12_928, 684_000, 999_600, 2.5e9, 5e12)] == [
        "0 B", "999 B", "12.9 KB", "684 KB", "1 MB", "2.5 GB", "5 TB"]
    assert [_tick(v, _unit(250_000)) for v in (0, 50_000, 250_000)] == ["0", "50 KB",
                                                                      "250 KB"]


@pytest.mark.parametrize("name", ["fit.jpg", "fit", "fit.png.txt", "fit.svg"])
def test_a_path_not_ending_in_png_is_refused(tmp_path, name):
    s, _ = lbfgs_like()
    with pytest.raises(SparkgdError, match=r"must end in \.png"):
        plot_summary(s, tmp_path / name)
    assert os.listdir(tmp_path) == []


def test_other_bad_paths_are_refused(tmp_path):
    s, _ = lbfgs_like()
    with pytest.raises(SparkgdError, match="only local paths"):
        plot_summary(s, "hdfs://nn/plots/fit.png")
    with pytest.raises(SparkgdError, match="does not exist"):
        plot_summary(s, tmp_path / "no" / "such" / "fit.png")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(SparkgdError, match="is a directory"):
        plot_summary(s, tmp_path / "dir.png")


@needs_matplotlib
def test_a_file_url_and_an_upper_case_suffix_are_fine(tmp_path):
    s, _ = lbfgs_like()
    out = plot_summary(s, f"file://{tmp_path}/FIT.PNG")
    assert out == str(tmp_path / "FIT.PNG") and png_size(out) == SIZE_PX


def test_without_matplotlib_the_error_says_how_to_get_it(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)    # None: "import fails"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    s, _ = lbfgs_like()
    with pytest.raises(SparkgdError) as err:
        plot_summary(s, tmp_path / "fit.png")
    assert str(err.value) == MISSING_MATPLOTLIB
    assert "pip install 'sparkgd[plot]'" in str(err.value)
    assert isinstance(err.value.__cause__, ImportError)
    assert os.listdir(tmp_path) == []


def test_plotting_touches_no_pyplot_state(tmp_path):
    """The OO API only: no pyplot import (a notebook's figures and backend stay)."""
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is an optional extra")
    had_pyplot = "matplotlib.pyplot" in sys.modules
    import matplotlib

    backend = matplotlib.get_backend() if had_pyplot else None
    s, _ = lbfgs_like()
    plot_summary(s, tmp_path / "fit.png")
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot
    if had_pyplot:
        assert matplotlib.get_backend() == backend
