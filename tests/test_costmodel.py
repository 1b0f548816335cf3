"""sparkgd.costmodel: the alpha-beta-gamma model of a pass, and jobs/costmodel.py (no Spark)."""
import importlib.util
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from sparkgd import codecs, costmodel as cm
from sparkgd.engine import collective

CODECS = [codecs.parse(c) for c in cm.DEFAULT_CODECS]
# A cluster with fixed prices: 50 us latency, 10 Gbit/s, 1 ns an addition, codecs
# at a few ns a value (topk: a costly encode, a cheap decode, as measured).
CLUSTER = cm.Machine(alpha=50e-6, beta=8 / 10e9, gamma=1e-9,
                     gamma_codec={"fp16": 10e-9, "topk": 8e-9, "qsgd": 30e-9},
                     gamma_decode={"fp16": 5e-9, "topk": 0.5e-9, "qsgd": 2e-9})
JOB = os.path.join(ROOT, "jobs", "costmodel.py")


def bandwidth(topology, P, n, codec="none", depth=2):
    return cm.pass_breakdown(topology, P, n, codec, CLUSTER, depth)["bandwidth"]


# ------------------------------------------------ bytes counted from the wire format

def encoded_size(codec, m):
    """Bytes of a vector of ``m`` values as the codec lays it out (sparkgd/codecs.py's
    module docstring): none m float64; fp16 a float64 scale and m float16; topk a uint32
    count, then k uint32 positions and k float32 values, k = ceil(fraction m) (at least
    one, at most m); qsgd a float64 norm and m levels, int8 up to 8 bits, else int16."""
    if codec.name == "none":
        return 8 * m
    if codec.name == "fp16":
        return 8 + 2 * m
    if codec.name == "topk":
        k = min(m, max(1, math.ceil(codec.fraction * m))) if m else 0
        return 4 + (4 + 4) * k
    return 8 + (1 if codec.bits <= 8 else 2) * m


def theta_message(codec, m, delta):
    """A theta message (collective.py): one kind byte (full or change), then theta as
    m float64, or its change encoded."""
    return 1 + (encoded_size(codec, m) if delta else 8 * m)


def sums_message(codec, m, head=True):
    """A message of sums: the loss and weight sums as two float64 (the head; a ring chunk
    other than chunk 0 has none), then the gradient's m values encoded."""
    return (16 if head else 0) + encoded_size(codec, m)


def wire_pass(topology, P, n, codec, depth=2, delta=None):
    """One pass's payload bytes walked link by link from the topologies' description
    (README "Topologies"), and the bytes on its slowest path -> (driver_out, driver_in,
    peers, path): no sparkgd function counts anything here."""
    delta = codec.name != "none" if delta is None else delta
    T, S = theta_message(codec, n, delta), sums_message(codec, n)
    if topology == "star":                        # P links, each one theta and one sums
        out, inn, peers = P * T, P * S, 0
        return out, inn, peers, out + inn         # all on the driver's one link
    if topology == "tree":
        f = max(math.ceil(P ** (1 / depth)), 2)   # treeAggregate's scale
        parent = {i: (i - 1) // f for i in range(1, P)}
        peers = sum(T + S for _ in parent)        # each task but 0: theta down, sums up
        height = 0
        for i in range(1, P):                     # hops from task i to task 0
            h, j = 0, i
            while j:
                j, h = parent[j], h + 1
            height = max(height, h)
        # the driver and task 0, then per level a parent's f children one after another
        return T, S, peers, (1 + height * f) * (T + S)
    # ring: chunk c of P (numpy.array_split's sizes) to task c; an all-gather and a
    # reduce-scatter each move every chunk over the P - 1 other links; chunk c's total
    # comes to the driver from task c - 1; chunk 0 carries the loss and weight sums
    sizes = [len(c) for c in np.array_split(np.arange(n), P)]
    out = sum(theta_message(codec, m, delta) for m in sizes)
    inn = sum(sums_message(codec, m, head=(c == 0)) for c, m in enumerate(sizes))
    peers = (P - 1) * out + (P - 1) * inn
    longest = theta_message(codec, sizes[0], delta) + sums_message(codec, sizes[0], True)
    return out, inn, peers, out + inn + (P - 1) * longest


WIRE_CODECS = CODECS + [codecs.parse("topk:0.1"), codecs.parse("qsgd:12")]


@pytest.mark.parametrize("codec", WIRE_CODECS, ids=str)
def test_message_sizes_are_what_the_codecs_put_on_the_wire(codec):
    """:func:`encoded_size` and the two message layouts against real messages."""
    rng = np.random.default_rng(0)
    for m in (1, 2, 5, 41, 1000):
        v = rng.normal(size=m)
        assert len(codecs.encode(codec, v, seed=(1, 2))[0]) == encoded_size(codec, m)
        held = v + rng.normal(size=m) * 1e-3
        for delta in (False, True):
            data, _ = collective.pack_theta(v, held if delta else None, codec)
            assert len(data) == theta_message(codec, m, delta and codec.lossy)
        data, _ = collective.pack_sums(np.array([1.0, 2.0]), v, codec, seed=(3,))
        assert len(data) == sums_message(codec, m)
        assert len(collective.pack_sums(None, v, codec, seed=(3,))[0]) == \
            sums_message(codec, m, head=False)


@pytest.mark.parametrize("topology", cm.TOPOLOGIES)
@pytest.mark.parametrize("codec", WIRE_CODECS, ids=str)
def test_the_models_bytes_are_counted_on_the_wire(topology, codec):
    """critical_path's pass bytes and slowest-path bytes against :func:`wire_pass`, the
    count written here from the message layouts (not collective.pass_bytes, which the
    model returns as it is)."""
    for P in (1, 2, 3, 5, 8, 64):
        for n in (1, 5, 41, 1000, 12345):
            for depth in (2, 3):
                for delta in (None, False, True):
                    out, inn, peers, path_bytes = wire_pass(topology, P, n, codec, depth,
                                                            delta)
                    path = cm.critical_path(topology, P, n, codec, depth, delta)
                    where = (P, n, depth, delta)
                    assert path["pass_bytes"] == {"driver_out": out, "driver_in": inn,
                                                  "peers": peers}, where
                    assert path["bytes"] == path_bytes, where


def test_the_cache_hands_out_copies():
    a = cm.critical_path("star", 4, 10)
    a["pass_bytes"]["driver_in"] = -1
    assert cm.critical_path("star", 4, 10)["pass_bytes"]["driver_in"] > 0


def test_message_counts_and_the_breakdown_are_the_formulas():
    n = 10**6
    for P in (8, 100, 4096):
        f = collective.fan_in(P, 2)
        h = collective.tree_height(P, f)
        assert cm.critical_path("star", P, n)["messages"] == 2 * P
        assert cm.critical_path("tree", P, n)["messages"] == 2 * (1 + h * f)
        assert cm.critical_path("ring", P, n)["messages"] == 2 * P + 2 * (P - 1)
        for t in cm.TOPOLOGIES:
            for c in CODECS:
                b = cm.pass_breakdown(t, P, n, c, CLUSTER, compute=0.25)
                path = cm.critical_path(t, P, n, c)
                enc, dec = CLUSTER.codec_prices(c)
                assert b["latency"] == pytest.approx(CLUSTER.alpha * path["messages"])
                assert b["bandwidth"] == pytest.approx(CLUSTER.beta * path["bytes"])
                assert b["reduce"] == pytest.approx(CLUSTER.gamma * path["adds"])
                assert b["codec"] == pytest.approx(enc * path["encoded"]
                                                   + dec * path["decoded"])
                assert b["compute"] == 0.25
                assert cm.pass_time(t, P, n, c, CLUSTER, compute=0.25) == pytest.approx(
                    sum(b.values()))
    # star: the driver adds and decodes all P; the tasks encode in parallel
    star = cm.critical_path("star", 100, n, "fp16")
    assert (star["adds"], star["encoded"], star["decoded"]) == (100 * n, 2 * n, n + 100 * n)


def test_star_grows_linearly_in_P():
    """star = A + B P at fixed d: every count is affine in P."""
    for n in (10**3, 10**7):
        for c in CODECS:
            t = [cm.pass_time("star", P, n, c, CLUSTER) for P in (8, 9, 1000, 1001, 9999, 10000)]
            assert t[1] - t[0] == pytest.approx(t[3] - t[2], rel=1e-9)
            assert t[1] - t[0] == pytest.approx(t[5] - t[4], rel=1e-9)
            assert t[5] > 100 * t[0]


def test_the_rings_bandwidth_is_about_constant_in_P():
    """bytes = driver (about all of theta and the sums) + (P - 1) chunks of n / P:
    between 1.75 and 2 times theta + sums (a little more: each chunk has a header of
    its own), whatever P."""
    n = 10**7
    for c in ("none", "fp16", "qsgd:8"):
        whole = cm.critical_path("star", 1, n, c)["bytes"]   # one theta + one sums
        terms = [bandwidth("ring", P, n, c) for P in (8, 64, 512, 4096, 10000)]
        for term in terms:
            assert 1.75 <= term / (CLUSTER.beta * whole) <= 2.05
        assert max(terms) / min(terms) < 1.15


def test_the_trees_bandwidth_grows_with_its_height_times_fan_in():
    n = 10**6
    whole = CLUSTER.beta * cm.critical_path("star", 1, n)["bytes"]
    for depth in (1, 2, 3, 4):
        prev = 0
        for P in (8, 64, 512, 4096):
            f = collective.fan_in(P, depth)
            h = collective.tree_height(P, f)
            term = bandwidth("tree", P, n, depth=depth)
            assert term == pytest.approx((1 + h * f) * whole)
            assert term > prev
            prev = term
    # deeper trees: fewer, shorter serial fans (h f: 4097, 129, 49, 33 at P = 4096)
    assert [bandwidth("tree", 4096, n, depth=k) / whole for k in (1, 2, 3, 4)] == \
        pytest.approx([4097, 129, 49, 33])
    # and the ring beats the tree on bandwidth once h f exceeds about 2
    assert bandwidth("ring", 4096, n) < bandwidth("tree", 4096, n) / 50


def test_winners_at_the_extremes():
    grid = cm.winners([8, 10000], [10**3, 10**9], cm.DEFAULT_CODECS, CLUSTER)
    # P = 10000, d = 1e9: star's link alone carries P (T + S) bytes, over 4000 times
    # what the ring's carries (about 2 (T + S)).
    big = grid[(10000, 10**9)]
    assert big["best"][0] != "star"
    assert big["best"][0] == "ring"
    assert big["times"][("star", "none")] > 1000 * big["seconds"]
    # P = 8, d = 1e3, 50 us: latency rules. The ring needs 2P + 2(P - 1) = 30 messages
    # (1.5 ms) where the star needs 16 and the tree (f = 3, h = 2) 2 (1 + 6) = 14; the
    # star's bytes (8 (T + S) = 128 kB: 0.1 ms) cannot make up the 14 alpha (0.7 ms).
    small = grid[(8, 10**3)]
    assert small["best"][0] in ("star", "tree")
    assert all(small["times"][("ring", c)] > small["seconds"] + 13 * CLUSTER.alpha
               for c in cm.DEFAULT_CODECS)
    # with codec none the tree needs fewer of everything than the star (14 < 16
    # messages, 7 < 8 messages' bytes, 6n < 8n adds): it wins for any prices
    exact = cm.winners([8], [10**3], ["none"], CLUSTER)[(8, 10**3)]
    assert exact["best"] == ("tree", "none")
    for k, v in cm.critical_path("tree", 8, 10**3).items():
        if k in ("messages", "bytes", "adds"):
            assert v < cm.critical_path("star", 8, 10**3)[k]


def test_codec_prices():
    assert CLUSTER.codec_prices("none") == (0.0, 0.0)
    assert CLUSTER.codec_prices("topk:0.05") == pytest.approx((7.5e-9, 0.5e-9))  # family
    half = cm.Machine(1, 1, 1, {"qsgd:4": 4e-9})
    assert half.codec_prices(codecs.parse("qsgd:4")) == pytest.approx((2e-9, 2e-9))
    with pytest.raises(KeyError, match="no gamma_codec for qsgd:8"):
        half.codec_prices("qsgd:8")


def test_cluster_keeps_the_gammas_and_takes_the_link():
    m = cm.cluster(25, 10, base=CLUSTER)
    assert m.alpha == pytest.approx(10e-6) and m.beta == pytest.approx(8 / 25e9)
    assert (m.gamma, m.gamma_codec, m.gamma_decode) == (
        CLUSTER.gamma, CLUSTER.gamma_codec, CLUSTER.gamma_decode)


def test_calibrate_measures_positive_finite_prices():
    m = cm.calibrate(seconds_budget=0.1)
    assert all(math.isfinite(x) and x > 0 for x in (m.alpha, m.beta, m.gamma))
    assert m.alpha < 0.1 and m.beta < 1e-6 and m.gamma < 1e-6
    assert set(m.gamma_codec) == {"fp16", "topk:0.01", "qsgd:8"}
    for name in m.gamma_codec:
        enc, dec = m.codec_prices(name)
        assert math.isfinite(enc) and math.isfinite(dec) and enc > 0 and dec > 0
    assert m.codec_prices("none") == (0.0, 0.0)
    local = cm.calibrate(seconds_budget=0.05, codecs_list=["none"], network=False)
    assert math.isnan(local.alpha) and local.gamma > 0 and local.gamma_codec == {}


def _run_job(args, hide_matplotlib=False):
    if hide_matplotlib:
        code = ("import runpy, sys; sys.modules['matplotlib'] = None; "
                f"sys.argv = [{JOB!r}] + {list(args)!r}; "
                f"runpy.run_path({JOB!r}, run_name='__main__')")
        cmd = [sys.executable, "-c", code]
    else:
        cmd = [sys.executable, JOB, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _prints_the_table(out):
    assert "per-pass time, every topology x codec" in out
    assert "best codec per topology, and the winner" in out
    rows = [line for line in out.splitlines() if line.lstrip().startswith("10000   1e9")]
    assert len(rows) == 2 and "ring" in rows[0].split("|")[-1]


def test_the_job_without_matplotlib_prints_the_table_then_exits_2(tmp_path):
    png = tmp_path / "cm.png"
    r = _run_job(["--budget", "0.1", "--png", str(png)], hide_matplotlib=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "sparkgd: error: --png needs matplotlib (pip install 'sparkgd[plot]')")
    _prints_the_table(r.stdout)
    assert not png.exists()


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                    reason="matplotlib (the plot extra) is not installed")
def test_the_job_writes_a_png(tmp_path):
    png = tmp_path / "cm.png"
    r = _run_job(["--budget", "0.1", "--png", str(png), "--latency-us", "20"])
    assert r.returncode == 0, r.stderr
    _prints_the_table(r.stdout)
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
