"""The alpha-beta-gamma cost model of one pass (sparkgd.costmodel): a table and a PNG.

    .venv/bin/python jobs/costmodel.py [--link-gbit 10] [--latency-us 50] [--depth 2]
        [--calibrate] [--codecs none,fp16,topk:0.01,qsgd:8] [--png costmodel.png]
    ./spark-submit.sh jobs/costmodel.py ...          (the same; it needs no Spark)

Measures this machine's arithmetic (gamma: float64 additions; each codec's encode and
decode) and prices the network as a cluster link (``--link-gbit``, ``--latency-us``);
``--calibrate`` also measures loopback TCP here (alpha, beta), prints it, and models this
machine unless a link option is given. Prints the per-pass time of every topology x
codec for P in 8 .. 10000 workers and d in 1e3 .. 1e9 parameters, then the best codec
of each topology and the overall winner, and draws them (matplotlib, the ``plot`` extra).
"""
import argparse
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (ROOT, HERE):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import numpy as np  # noqa: E402

from sparkgd import costmodel as cm  # noqa: E402
from train import _restore_stderr  # noqa: E402  (jobs/train.py: the one copy)

TABLE_P = (8, 64, 512, 4096, 10000)
TABLE_D = (10**3, 10**5, 10**7, 10**9)
LINESTYLES = {"star": "-", "tree": "--", "ring": ":"}
FAMILIES = {"star": "Reds", "tree": "Greens", "ring": "Blues"}


def fmt_seconds(t):
    """Three significant digits with a unit: 812us, 12.3ms, 4.56s, 1.3e+05s."""
    if t < 1e-3:
        return f"{t * 1e6:.3g}us"
    if t < 1:
        return f"{t * 1e3:.3g}ms"
    if t < 1e4:
        return f"{t:.3g}s"
    return f"{t:.2g}s"


def fmt_d(d):
    e = math.log10(d)
    return f"1e{e:.0f}" if e == round(e) else f"{d:.3g}"


def describe(machine, names):
    lines = [f"alpha {machine.alpha * 1e6:.3g} us/message, beta {machine.beta * 1e9:.3g} "
             f"ns/byte ({8 / machine.beta / 1e9:.3g} Gbit/s), gamma "
             f"{machine.gamma * 1e9:.3g} ns/add"]
    for name in names:
        enc, dec = machine.codec_prices(name)
        if enc + dec:
            lines.append(f"  {name}: {(enc + dec) * 1e9:.3g} ns/value encoded+decoded "
                         f"(decode {dec * 1e9:.3g})")
    return lines


def full_table(result, names, topologies=cm.TOPOLOGIES):
    """Every topology x codec, one row per (P, d), grouped by topology."""
    w = max(9, *(len(n) + 1 for n in names))
    group = w * len(names)
    head = f"{'':>6} {'':>5} |" + "|".join(f"{t:^{group}}" for t in topologies) + "| best"
    sub = f"{'P':>6} {'d':>5} |" + "|".join(
        "".join(f"{n:>{w}}" for n in names) for _ in topologies) + "|"
    rows = [head, sub, "-" * len(head)]
    for (P, d), r in result.items():
        cells = "|".join("".join(f"{fmt_seconds(r['times'][(t, n)]):>{w}}" for n in names)
                         for t in topologies)
        rows.append(f"{P:>6} {fmt_d(d):>5} |{cells}| {r['best'][0]} {r['best'][1]}")
    return rows


def summary_table(result, topologies=cm.TOPOLOGIES):
    """The best codec of each topology, the winner, and how much the runner-up
    topology (with its best codec) is slower."""
    head = (f"{'P':>6} {'d':>5} | " + " | ".join(f"{t + ' (best codec)':<24}" for t in topologies)
            + " | winner                 x next")
    rows = [head, "-" * len(head)]
    for (P, d), r in result.items():
        best = {t: min(((s, n) for (tt, n), s in r["times"].items() if tt == t))
                for t in topologies}
        order = sorted(topologies, key=lambda t: best[t])
        cells = " | ".join(f"{fmt_seconds(best[t][0]):>9} {best[t][1]:<14}" for t in topologies)
        margin = best[order[1]][0] / best[order[0]][0]
        rows.append(f"{P:>6} {fmt_d(d):>5} | {cells} | "
                    f"{order[0] + ' ' + best[order[0]][1]:<22} {margin:6.3g}")
    return rows


def plot(path, machine, names, depth, P_grid, d_grid):
    """Per-pass time vs P for four d (log-log), and who wins over the (P, d) grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig = plt.figure(figsize=(18, 11), layout="constrained")
    grid = fig.add_gridspec(2, 3, width_ratios=[1, 1, 1.35])
    colours = {n: f"C{i}" for i, n in enumerate(names)}
    for k, d in enumerate(TABLE_D):
        ax = fig.add_subplot(grid[k // 2, k % 2])
        for t in cm.TOPOLOGIES:
            for n in names:
                ax.plot(P_grid, [cm.pass_time(t, P, d, n, machine, depth) for P in P_grid],
                        LINESTYLES[t], color=colours[n], lw=1.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"d = {fmt_d(d)} parameters")
        ax.set_xlabel("workers P")
        ax.set_ylabel("seconds per pass")
        ax.grid(True, which="major", alpha=0.3)
    handles = ([Line2D([], [], color="k", ls=LINESTYLES[t], label=t) for t in cm.TOPOLOGIES]
               + [Line2D([], [], color=colours[n], lw=3, label=n) for n in names])
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles),
               title="topology (line style), codec (colour)")

    # who wins where: over every codec, and with the first codec alone
    shades = np.linspace(0.85, 0.4, len(names)) if len(names) > 1 else [0.6]
    palette = {(t, n): plt.get_cmap(FAMILIES[t])(s)
               for t in cm.TOPOLOGIES for n, s in zip(names, shades)}
    for row, (title, pool) in enumerate(
            [("fastest topology + codec", names),
             (f"fastest topology with codec {names[0]}", names[:1])]):
        ax = fig.add_subplot(grid[row, 2])
        result = cm.winners(P_grid, d_grid, pool, machine, depth)
        combos = [(t, n) for t in cm.TOPOLOGIES for n in pool]
        index = np.array([[combos.index(result[(int(P), int(d))]["best"]) for P in P_grid]
                          for d in d_grid])
        ax.pcolormesh(_edges(P_grid), _edges(d_grid), index,
                      cmap=ListedColormap([palette[c] for c in combos]),
                      norm=BoundaryNorm(np.arange(len(combos) + 1) - 0.5, len(combos)))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("workers P")
        ax.set_ylabel("parameters d")
        ax.set_title(title)
        seen = sorted(set(index.ravel().tolist()))
        ax.legend(handles=[Patch(color=palette[combos[i]],
                                 label=" + ".join(combos[i]) if len(pool) > 1 else combos[i][0])
                           for i in seen], loc="upper left", title="winner", framealpha=0.9)
    fig.suptitle(f"sparkgd per-pass time, alpha-beta-gamma model: alpha "
                 f"{machine.alpha * 1e6:.3g} us, {8 / machine.beta / 1e9:.3g} Gbit/s, gamma "
                 f"{machine.gamma * 1e9:.2g} ns/add, tree depth {depth}", fontsize=14)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _edges(centres):
    """Cell edges for ``centres`` on a log axis: geometric midpoints."""
    c = np.log(np.asarray(centres, dtype=float))
    mid = (c[1:] + c[:-1]) / 2
    return np.exp(np.concatenate([[2 * c[0] - mid[0]], mid, [2 * c[-1] - mid[-1]]]))


def main(argv=None):
    p = argparse.ArgumentParser(prog="jobs/costmodel.py", description=__doc__.split("\n")[0])
    p.add_argument("--link-gbit", type=float, default=None, help="link speed (default 10)")
    p.add_argument("--latency-us", type=float, default=None,
                   help="one-way latency of a message (default 50)")
    p.add_argument("--depth", type=int, default=2, help="tree depth (aggregationDepth)")
    p.add_argument("--calibrate", action="store_true",
                   help="also measure alpha and beta here (loopback TCP) and print them; "
                        "models this machine unless --link-gbit/--latency-us is given")
    p.add_argument("--codecs", default=",".join(cm.DEFAULT_CODECS))
    p.add_argument("--png", default="costmodel.png")
    p.add_argument("--budget", type=float, default=3.0, help="seconds for calibration")
    args = p.parse_args(argv)
    try:
        names = [str(cm.as_codec(c)) for c in args.codecs.split(",") if c.strip()]
    except ValueError as e:
        p.error(str(e))
    if not names or args.depth < 1 or args.budget <= 0:
        p.error("need at least one codec, --depth >= 1 and --budget > 0")

    here = cm.calibrate(args.budget, names, network=args.calibrate)
    if args.calibrate:
        print("measured here (loopback TCP, NumPy, sparkgd.codecs):")
        print("\n".join("  " + line for line in describe(here, names)) + "\n")
    if args.calibrate and args.link_gbit is None and args.latency_us is None:
        machine, where = here, "this machine (loopback)"
    else:
        gbit = 10.0 if args.link_gbit is None else args.link_gbit
        lat = 50.0 if args.latency_us is None else args.latency_us
        machine = cm.cluster(gbit, lat, base=here)
        where = f"a cluster: {gbit:g} Gbit/s links, {lat:g} us latency, this machine's gammas"
    print(f"model: {where}, tree depth {args.depth}")
    print("\n".join("  " + line for line in describe(machine, names)))

    result = cm.winners(TABLE_P, TABLE_D, names, machine, args.depth)
    print("\nper-pass time, every topology x codec:")
    print("\n".join(full_table(result, names)))
    print("\nbest codec per topology, and the winner (x next: the runner-up topology's time "
          "over the winner's):")
    print("\n".join(summary_table(result)))
    sys.stdout.flush()

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("sparkgd: error: --png needs matplotlib (pip install 'sparkgd[plot]')",
              file=sys.stderr)
        return 2
    P_grid = np.unique(np.round(np.logspace(math.log10(8), 4, 21)).astype(int))
    d_grid = np.round(10 ** np.arange(3, 9.01, 0.5)).astype(np.int64)
    try:
        plot(args.png, machine, names, args.depth, P_grid, d_grid)
    except OSError as e:
        print(f"sparkgd: error: cannot write --png {args.png}: {e.strerror or e}",
              file=sys.stderr)
        return 2
    print(f"\nwrote {args.png}")
    return 0


if __name__ == "__main__":
    _restore_stderr()
    sys.exit(main())
