"""``jobs/benchmark.py --modes``: sync, local and async on the same data, with and
without one serving task slowed.

    ./spark-submit.sh --master 'local[4]' --driver-memory 4g jobs/benchmark.py --modes \\
        --rows 400000 --features 50

One session, ``--tasks`` serving tasks (the master needs that many slots), generated
logistic data. First the optimum F* (lbfgs, tol 1e-12). Then, for each scenario --
every task at its own pace, and task 1 slowed ``--slow`` times (the test knob
``spark.sparkgd.testing.slowTask``, which makes a task sleep the rest) -- one fit per
mode with ``sgd`` (``--step-size``, ``--max-iter`` iterations, ``tol=0``): sync; local
(``--local-steps``); async (``--staleness``). Each fit reports

* iterations and seconds until F is within ``--target`` (relative) of F*, read from
  ``objectiveHistory`` and ``objectiveTimes``; passes over the data by then (local:
  rounds x localSteps; async: clocks);
* its final F, wall time, task-time skew (median over passes of slowest / median) and
  rows per task;
* for async and local: seconds to reach sync's final F in the same scenario, over
  sync's wall time (the ratio the slowed scenario is about). Async's history (staleness
  >= 1) holds estimates, so for it only the exact last entry counts: its whole training
  time when its final F is at or below sync's (an upper bound), else no ratio.

Prints a table and writes JSON with ``--json``.
"""
import json
import os
import statistics
import time


def reach(history, times, target):
    """-> (iterations, seconds) at the first entry <= target, or (None, None)."""
    for k, (f, t) in enumerate(zip(history, times)):
        if f <= target:
            return k + 1, t
    return None, None


def run(spark, args):
    from sparkgd import LogisticRegression, datagen
    from sparkgd.engine.jobs import SLOW_TASK_CONF
    from sparkgd.engine.slots import task_slots

    tasks = int(args.tasks)
    slots = task_slots(spark.sparkContext)
    if slots < tasks:
        raise SystemExit(f"--modes needs {tasks} task slots, the master has {slots} "
                         f"(run with --master 'local[{tasks}]')")
    rows, d = int(args.rows), int(args.features)
    path = os.path.join(args.tmp, "data")
    datagen.write_dataset(path, task="binary", rows=rows, features=d, partitions=tasks)
    df = spark.read.parquet(path)
    print(f"generated {rows} x {d} in {tasks} partitions; {slots} task slots on "
          f"{os.cpu_count()} cores", flush=True)
    common = dict(regParam=args.reg_param, tol=0.0)
    t0 = time.perf_counter()
    best = LogisticRegression(maxIter=1000, tol=1e-12, **{"regParam": args.reg_param}).fit(df)
    f_opt = best.summary.objectiveHistory[-1]
    print(f"optimum F* = {f_opt:.10g} (lbfgs, {best.summary.totalIterations} iterations, "
          f"{time.perf_counter() - t0:.1f}s)", flush=True)
    target = f_opt + args.target * abs(f_opt)
    modes = [("sync", {}), ("local", {"localSteps": args.local_steps}),
             ("async", {"staleness": args.staleness})]
    results = {"rows": rows, "features": d, "tasks": tasks, "optimum": f_opt,
               "target": args.target, "step_size": args.step_size, "max_iter": args.max_iter,
               "slow": args.slow, "runs": []}
    for scenario in ("even", f"task 1 x{args.slow:g}"):
        if scenario == "even":
            spark.conf.unset(SLOW_TASK_CONF)
        else:
            spark.conf.set(SLOW_TASK_CONF, f"1:{args.slow:g}")
        sync_final = sync_wall = None
        for mode, extra in modes:
            est = LogisticRegression(optimizer="sgd", stepSize=args.step_size,
                                     maxIter=args.max_iter, mode=mode, **common, **extra)
            t = time.perf_counter()
            s = est.fit(df).summary
            wall = time.perf_counter() - t
            hist, times = s.objectiveHistory, s.objectiveTimes
            its, secs = reach(hist, times, target)
            per_iter = args.local_steps if mode == "local" else 1
            run = {"scenario": scenario, "mode": mode, "final": hist[-1],
                   "gap": (hist[-1] - f_opt) / abs(f_opt), "iterations": s.totalIterations,
                   "training_seconds": s.trainingSeconds, "wall_seconds": wall,
                   "to_target_iterations": its, "to_target_seconds": secs,
                   "to_target_passes": None if its is None else its * per_iter,
                   "skew": statistics.median(s.taskTimeSkew) if s.taskTimeSkew else None,
                   "rows_per_task": s.rowsPerTask}
            if mode == "async" and extra.get("staleness", 0) > 0:
                # its history before the last entry holds estimates (pushes at different
                # models, lighter pushes): only the last entry, exact, is compared
                its = secs = None
                run["to_target_iterations"] = run["to_target_passes"] = None
                run["to_target_seconds"] = None
            if mode == "sync":
                sync_final, sync_wall = hist[-1], s.trainingSeconds
            else:
                if mode == "async":
                    t_reach = s.trainingSeconds if hist[-1] <= sync_final else None
                else:
                    t_reach = reach(hist, times, sync_final)[1]
                run["to_sync_final_seconds"] = t_reach
                run["ratio_to_sync"] = None if t_reach is None else t_reach / sync_wall
            results["runs"].append(run)
            print(f"  {scenario:>10} {mode:>5}: final gap {run['gap']:.2e}, "
                  f"{s.trainingSeconds:.2f}s training", flush=True)
    spark.conf.unset(SLOW_TASK_CONF)
    print()
    print(f"sgd, stepSize {args.step_size}, maxIter {args.max_iter}, {tasks} tasks; target "
          f"{args.target:g} of F* = {f_opt:.8g}; local: {args.local_steps} steps a round; "
          f"async: staleness {args.staleness}")
    head = (f"{'scenario':>11} {'mode':>5} {'final gap':>10} {'train s':>8} {'iters->tgt':>10} "
            f"{'passes->tgt':>11} {'s->tgt':>7} {'s->sync F':>9} {'ratio':>6} {'skew':>5}")
    print(head)
    print("-" * len(head))

    def fmt(v, spec):
        if v is not None:
            return format(v, spec)
        return format("-", spec.split(".")[0])       # the width alone

    for r in results["runs"]:
        print(f"{r['scenario']:>11} {r['mode']:>5} {r['gap']:>10.2e} "
              f"{r['training_seconds']:>8.2f} {fmt(r['to_target_iterations'], '>10')} "
              f"{fmt(r['to_target_passes'], '>11')} {fmt(r['to_target_seconds'], '>7.2f')} "
              f"{fmt(r.get('to_sync_final_seconds'), '>9.2f')} "
              f"{fmt(r.get('ratio_to_sync'), '>6.2f')} {fmt(r['skew'], '>5.2f')}")
    print("ratio: seconds to reach sync's final F in the same scenario / sync's training "
          "seconds (async: its whole training time, when its exact final F is at or below "
          "sync's; its history holds estimates); skew: median over passes (async: clocks) "
          "of slowest / median task time")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
