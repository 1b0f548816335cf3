"""What the cluster can run at once, and how Spark grouped the data into tasks.

Asked of the live ``SparkContext`` (and, for lineage, of Spark's JVM objects); the
engine uses the answers to size its jobs. Nothing here holds state.
"""
from __future__ import annotations

import os


def local_cores(master):
    """Task slots of a ``local``/``local[N]``/``local[*]``/``local[N,F]`` master;
    None for any other master (a cluster: its slots are not known up front)."""
    import re

    m = re.fullmatch(r"local(?:\[(\*|\d+)(?:,\s*\d+)?\])?", master.strip())
    if m is None:
        return None
    n = m.group(1)
    if n is None:
        return 1
    return max(1, os.cpu_count() or 1) if n == "*" else max(1, int(n))


def task_layout(sc):
    """-> (tasks per pass, threads per task): one task per executor using its cores.

    ``local[N]`` is one executor with N cores; elsewhere ``spark.executor.cores``
    (default 1) says how many cores each executor has.
    """
    cores = local_cores(sc.master)
    if cores is not None:
        return 1, cores
    slots = max(1, sc.defaultParallelism)
    cores = int(sc.getConf().get("spark.executor.cores", "1") or 1)
    cores = max(1, min(cores, slots))
    return max(1, slots // cores), cores


def task_cpus(sc):
    """``spark.task.cpus``: the cores each task gets."""
    return max(1, int(sc.getConf().get("spark.task.cpus", "1") or 1))


def task_slots(sc):
    """Tasks that can run at once: the slots of the executors registered now (what
    Spark's barrier mode checks against; in local mode the cores Spark itself counted,
    which respects a container's CPU limit), else the master's ``local[N]``, else
    ``defaultParallelism`` over ``spark.task.cpus``."""
    try:
        jsc = sc._jsc.sc()
        slots = int(jsc.maxNumConcurrentTasks(
            jsc.resourceProfileManager().defaultResourceProfile()))
    except Exception:  # an internal method: if a Spark version lacks it, estimate
        slots = 0
    if slots > 0:
        return slots
    cores = local_cores(sc.master)
    if cores is not None:
        return cores
    conf, cpus = sc.getConf(), task_cpus(sc)
    instances = conf.get("spark.executor.instances", None)
    per = conf.get("spark.executor.cores", None)
    if instances and per:   # no executor has registered yet: what was asked for
        return max(1, int(instances) * int(per) // cpus)
    return max(1, sc.defaultParallelism // cpus)


def coalesced_parents(rdd):
    """Data partitions behind each partition of ``rdd``, a ``coalesce`` of them, as
    Spark's own CoalescedRDD grouped them."""
    return [[int(i) for i in part.parentsIndices()] for part in rdd._jrdd.rdd().partitions()]


def coalesced_input_partitions(rdd):
    """Partitions of the data under the ``coalesce`` in ``rdd``'s lineage (None if
    there is none, or Spark's internals do not say)."""
    try:
        todo, seen = [rdd._jrdd.rdd()], 0
        while todo and seen < 100:
            r = todo.pop()
            seen += 1
            if r.getClass().getSimpleName() == "CoalescedRDD":
                return int(r.prev().getNumPartitions())
            deps = r.dependencies()
            todo.extend(deps.apply(j).rdd() for j in range(deps.size()))
    except Exception:  # pragma: no cover - internals of another Spark version
        pass
    return None


def dynamic_allocation(sc):
    """Whether executors come and go (``spark.dynamicAllocation.enabled``)."""
    return sc.getConf().get("spark.dynamicAllocation.enabled", "false").strip().lower() == "true"


#: Spark conf: how many serving tasks a fit from a Spark Connect session runs (its
#: client cannot ask the cluster how many task slots it has).
TASKS_CONF = "spark.sparkgd.tasks"


def conf_flag(get, key):
    return str(get(key) or "false").strip().lower() == "true"


def session_slots(get):
    """Task slots, estimated from what a Spark Connect client can read of the conf
    (``get(key) -> str or None``): :data:`TASKS_CONF` if set; a ``local[N]`` master's N;
    executors x cores (static allocation), or ``spark.cores.max``, over
    ``spark.task.cpus``; else ``spark.default.parallelism``. None when none says."""
    explicit = get(TASKS_CONF)
    if explicit:
        try:
            value = int(str(explicit).strip())
        except ValueError:
            value = 0
        if value < 1:
            from ..errors import SparkgdError

            raise SparkgdError(f"{TASKS_CONF} must be a number of tasks >= 1, got {explicit!r}")
        return value
    master = get("spark.master") or ""
    cores = local_cores(master)
    cpus = max(1, int(get("spark.task.cpus") or 1))
    if cores is not None:
        return max(1, cores // cpus)
    instances, per = get("spark.executor.instances"), get("spark.executor.cores")
    if instances and per:
        return max(1, int(instances) * int(per) // cpus)
    most = get("spark.cores.max")
    if most:
        return max(1, int(most) // cpus)
    parallelism = get("spark.default.parallelism")
    if parallelism:
        return max(1, int(parallelism) // cpus)
    return None
