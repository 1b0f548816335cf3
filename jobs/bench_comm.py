"""``jobs/benchmark.py --comm``: time and bytes of one pass by topology and codec.

    ./spark-submit.sh --master 'local[16]' --driver-memory 4g jobs/benchmark.py --comm \\
        --rows 16000 --features 2000

For P = 2, 4, 8, 16 serving tasks (the master needs that many slots; on a machine with
fewer cores the tasks share them -- the table says how oversubscribed), on the same
generated logistic data (``--features`` wide), with every topology (star, tree, ring)
and codec (none, fp16, topk:0.01, qsgd:8, theta sent the way a fixed-step optimizer
sends it):

* the measured time of one pass (median of ``--passes``, theta changing a little
  each pass, as in a fit), of the same pass over an (almost) empty mini-batch -- what
  the topology and codec cost, the kernel aside -- and the bytes every link and the
  driver's links carried;
* the alpha-beta-gamma model (:mod:`sparkgd.costmodel`): beta, gamma and the codecs'
  prices calibrated on loopback first; alpha (sparkgd's cost of a message through its
  hub, framing and HMAC included) and a fixed cost per pass fitted to the star/none
  empty passes; the tasks' compute from the star/none full pass at the same P. The
  other 44 configurations are predictions; bytes come from
  :func:`sparkgd.engine.collective.pass_bytes`.

Prints a table with the measured/model ratios and writes JSON with ``--json``.
"""
import json
import os
import statistics
import time

import numpy as np

CODECS = ("none", "fp16", "topk:0.01", "qsgd:8")
TOPOLOGIES = ("star", "tree", "ring")


def run(spark, args):
    from sparkgd import codecs, costmodel, datagen, kernels
    from sparkgd.data import resolve_input
    from sparkgd.engine import Engine, collective
    from sparkgd.engine.slots import task_slots
    from sparkgd.modes.sync import DistributedObjective
    from sparkgd.penalties import Penalty

    sc = spark.sparkContext
    slots = task_slots(sc)
    tasks_list = [p for p in args.comm_tasks if p <= slots]
    skipped = [p for p in args.comm_tasks if p > slots]
    cores = os.cpu_count() or 1
    rows, d = int(args.rows), int(args.features)
    path = os.path.join(args.tmp, "data")
    datagen.write_dataset(path, task="binary", rows=rows, features=d,
                          partitions=max(tasks_list))
    print(f"generated {rows} x {d}; {slots} task slots on {cores} cores"
          + (f"; P = {skipped} skipped (more than the slots)" if skipped else ""), flush=True)
    t0 = time.perf_counter()
    machine = costmodel.calibrate(args.calibrate_seconds, codecs_list=CODECS)
    print(f"calibrated in {time.perf_counter() - t0:.1f}s: alpha {machine.alpha * 1e6:.1f} us, "
          f"beta {machine.beta * 1e9:.3f} ns/byte, gamma {machine.gamma * 1e9:.2f} ns/add",
          flush=True)

    df = spark.read.parquet(path)
    spec = resolve_input(df.schema)
    loss = kernels.make_loss("logistic")
    layout = kernels.Layout(d, 1, True)
    n = layout.size
    rng = np.random.default_rng(0)
    results = []
    for p in tasks_list:
        with Engine.open(df, spec, num_partitions=p, store="served") as engine:
            assert engine.num_tasks == p, (engine.num_tasks, p)
            for topology in TOPOLOGIES:
                for name in CODECS:
                    codec = codecs.parse(name)
                    engine.topology = topology
                    obj = DistributedObjective(engine, loss, layout, Penalty(layout),
                                               codec=codec, theta_codec=codec)
                    theta = rng.normal(size=n) * 0.01
                    obj(theta)                         # theta in full; links made
                    b0, d0 = engine.bytes_communicated, engine.driver_bytes
                    full, empty = [], []
                    for k in range(args.passes):
                        theta = theta + rng.normal(size=n) * 1e-4
                        t = time.perf_counter()
                        obj(theta)
                        full.append(time.perf_counter() - t)
                        # the same pass over an (almost) empty mini-batch: all but the
                        # kernel's work, i.e. what the topology and codec cost
                        theta = theta + rng.normal(size=n) * 1e-4
                        t = time.perf_counter()
                        obj.smooth(theta, sample=(1e-9, 0, k))
                        empty.append(time.perf_counter() - t)
                    moved = (engine.bytes_communicated - b0) / (2 * args.passes)
                    driver = (engine.driver_bytes - d0) / (2 * args.passes)
                    model_bytes = collective.pass_bytes(topology, p, n, codec, depth=2)
                    results.append({
                        "tasks": p, "topology": topology, "codec": name,
                        "oversubscribed": round(p / cores, 2),
                        "pass_ms": statistics.median(full) * 1e3,
                        "empty_ms": statistics.median(empty) * 1e3,
                        "bytes": moved, "model_bytes": sum(model_bytes.values()),
                        "driver_bytes": driver,
                        "model_driver_bytes": model_bytes["driver_out"]
                        + model_bytes["driver_in"],
                        "fell_back": engine.topology != topology})
                    r = results[-1]
                    print(f"P={p:2d} {topology:4s} {name:9s} pass {r['pass_ms']:8.2f} ms, "
                          f"empty {r['empty_ms']:7.2f} ms, bytes {moved:10.0f} (model "
                          f"{r['model_bytes']}), driver {driver:10.0f}", flush=True)
    machine = _fit_model(results, machine, n)
    _table(results)
    results_machine = machine
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "features": d, "cores": cores, "slots": slots,
                       "machine": {"alpha": results_machine.alpha,
                                   "beta": results_machine.beta,
                                   "gamma": results_machine.gamma,
                                   "gamma_codec": results_machine.gamma_codec},
                       "results": results}, f, indent=1)
    return results


def _fit_model(results, machine, n):
    """The engine's own price of a message: alpha and a fixed cost per pass, fitted by
    least squares to the star/none passes over empty mini-batches (``2P`` messages),
    beta, gamma and the codecs' prices as calibrated; then every row's model times:
    empty = fixed + the topology's and codec's model, full = that + the tasks' compute,
    taken from the star/none pass (full minus empty) at the same P."""
    import dataclasses

    from sparkgd import costmodel

    base = [r for r in results if r["topology"] == "star" and r["codec"] == "none"]
    msgs = np.array([2.0 * r["tasks"] for r in base])
    rest = np.array([r["empty_ms"] / 1e3 - costmodel.pass_time(
        "star", r["tasks"], n, "none", dataclasses.replace(machine, alpha=0.0))
        for r in base])
    A = np.c_[np.ones_like(msgs), msgs]
    (fixed, alpha), *_ = np.linalg.lstsq(A, rest, rcond=None)
    alpha = max(float(alpha), 0.0)
    machine = dataclasses.replace(machine, alpha=alpha)
    compute = {r["tasks"]: max(r["pass_ms"] - r["empty_ms"], 0.0) / 1e3 for r in base}
    print(f"\nfitted on the star/none empty passes: alpha {alpha * 1e6:.1f} us a message "
          f"(sparkgd's frames through the hub's loop, HMAC included), fixed "
          f"{fixed * 1e3:.2f} ms a pass")
    for r in results:
        t = costmodel.pass_time(r["topology"], r["tasks"], n, r["codec"], machine, depth=2)
        r["model_empty_ms"] = (fixed + t) * 1e3
        r["model_ms"] = (fixed + t + compute[r["tasks"]]) * 1e3
        r["empty_ratio"] = r["empty_ms"] / r["model_empty_ms"]
        r["time_ratio"] = r["pass_ms"] / r["model_ms"]
    return machine


def _table(results):
    print()
    print(f"{'P':>3} {'over':>5} {'topology':8} {'codec':9} {'pass ms':>8} {'model':>8} "
          f"{'ratio':>6} {'empty ms':>8} {'model':>8} {'ratio':>6} {'bytes/pass':>11} "
          f"{'vs none':>8} {'driver B':>9} {'vs star':>8}")
    by = {(r["tasks"], r["topology"], r["codec"]): r for r in results}
    for r in results:
        none = by[(r["tasks"], r["topology"], "none")]
        star = by[(r["tasks"], "star", r["codec"])]
        exact = "" if r["bytes"] == r["model_bytes"] else " (model %d)" % r["model_bytes"]
        print(f"{r['tasks']:>3} {r['oversubscribed']:>5.1f} {r['topology']:8} {r['codec']:9} "
              f"{r['pass_ms']:>8.2f} {r['model_ms']:>8.2f} {r['time_ratio']:>6.2f} "
              f"{r['empty_ms']:>8.2f} {r['model_empty_ms']:>8.2f} {r['empty_ratio']:>6.2f} "
              f"{r['bytes']:>11.0f} {r['bytes'] / none['bytes']:>8.3f} "
              f"{r['driver_bytes']:>9.0f} {r['driver_bytes'] / star['driver_bytes']:>8.3f}"
              + exact + (" FELL BACK TO STAR" if r["fell_back"] else ""))
    for key, what in (("time_ratio", "full passes"), ("empty_ratio", "empty passes")):
        within = [r for r in results if 0.75 <= r[key] <= 1.25]
        print(f"model within 25% of the measured time, {what}: {len(within)} of "
              f"{len(results)}")
    print(f"bytes equal to the model's: "
          f"{sum(r['bytes'] == r['model_bytes'] for r in results)} of {len(results)}")
