"""The training summary a model carries and saves."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class TrainingSummary:
    """What a fit did. ``objectiveHistory[-1]`` is F at the returned coefficients."""

    objectiveHistory: list = field(default_factory=list)
    totalIterations: int = 0
    trainingSeconds: float = 0.0
    #: bytes sent on every link (theta out, partial results back, tree levels), whole fit
    bytesCommunicated: int = 0
    #: the part of it into and out of the driver
    driverBytes: int = 0
    numEvaluations: int = 0
    converged: bool = False
    message: str = ""
    numRows: int = 0
    numPartitions: int = 0
    #: connections the driver's hub dropped: strangers on its port, bad or replayed
    #: frames, stalled tasks (none on a quiet network)
    droppedConnections: int = 0
    #: seconds from the start of training at which each objectiveHistory entry was known
    objectiveTimes: list = field(default_factory=list)
    #: how the tasks updated the model: sync, local or async
    mode: str = "sync"
    #: per pass (async: per clock) the slowest serving task's time over the median's
    taskTimeSkew: list = field(default_factory=list)
    #: rows each serving task held
    rowsPerTask: list = field(default_factory=list)
    #: async: pushes not applied (duplicated, or not asked for)
    rejectedPushes: int = 0

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})
