"""Driver checkpoints and the divergence guard (issue 14): a fit whose driver dies after
a checkpoint resumes to the uninterrupted model; a checkpoint of other data or params
is refused; a diverging fit stops with the iteration and keeps its last checkpoint."""
import json
import os

import numpy as np
import pytest

from sparkgd import checkpoint as ckpt
from sparkgd.errors import SparkgdError

from conftest import logistic_data, regression_data, to_df


class DriverLost(BaseException):
    """What the test raises where a driver would have died (not an Exception: nothing
    in the fit may catch it)."""


@pytest.fixture(scope="module")
def data(spark):
    X, y, w = logistic_data(n=800, d=6, seed=11, weights=True)
    df = to_df(spark, X, y, w, partitions=3).cache()
    df.count()
    return df


def die_after_checkpoint(monkeypatch, at):
    real = ckpt.Checkpointer.save

    def save(self, iteration, *args, **kw):
        real(self, iteration, *args, **kw)
        if iteration >= at:
            raise DriverLost(f"driver lost after the checkpoint of iteration {iteration}")

    monkeypatch.setattr(ckpt.Checkpointer, "save", save)


CASES = [
    ("lbfgs", dict(optimizer="lbfgs", regParam=0.05, elasticNetParam=0.5, tol=1e-10)),
    ("gd", dict(optimizer="gd", regParam=0.02, maxIter=40, tol=0)),
    ("sgd batch", dict(optimizer="sgd", stepSize=0.5, miniBatchFraction=0.3, maxIter=30,
                       tol=0, seed=3)),
    ("adam std", dict(optimizer="adam", stepSize=0.05, standardization=True, regParam=0.01,
                      maxIter=30, tol=0)),
    ("local", dict(optimizer="momentum", stepSize=0.05, mode="local", localSteps=3,
                   maxIter=20, tol=0)),
    ("async s=0", dict(optimizer="sgd", stepSize=0.3, mode="async", staleness=0,
                       maxIter=30, tol=0)),
]


@pytest.mark.parametrize("name, params", CASES, ids=[c[0] for c in CASES])
def test_a_resumed_fit_ends_with_the_uninterrupted_model(data, tmp_path, monkeypatch, name,
                                                         params):
    from sparkgd import LogisticRegression

    common = dict(weightCol="weight", **params)
    want = LogisticRegression(**common).fit(data)
    directory = str(tmp_path / "ck")
    with monkeypatch.context() as m:
        die_after_checkpoint(m, 4)
        with pytest.raises(DriverLost):
            LogisticRegression(checkpointDir=directory, checkpointInterval=2, **common).fit(data)
    meta = json.load(open(os.path.join(directory, ckpt.META)))
    assert meta["iteration"] == 4 and len(meta["objectiveHistory"]) in (3, 4)
    got = LogisticRegression(checkpointDir=directory, checkpointInterval=2, resume=True,
                             **common).fit(data)
    np.testing.assert_allclose(got.coefficients, want.coefficients, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got.intercept, want.intercept, rtol=1e-9, atol=1e-12)
    a, b = got.summary.objectiveHistory, want.summary.objectiveHistory
    assert len(a) == len(b) and got.summary.totalIterations == want.summary.totalIterations
    np.testing.assert_allclose(a, b, rtol=1e-9)
    assert not os.path.exists(os.path.join(directory, ckpt.META))   # done: removed


def test_a_checkpoint_of_other_data_or_params_is_refused(spark, data, tmp_path, monkeypatch):
    from sparkgd import LogisticRegression

    directory = str(tmp_path / "ck")
    common = dict(weightCol="weight", optimizer="gd", maxIter=10, tol=0,
                  checkpointDir=directory, checkpointInterval=2)
    with monkeypatch.context() as m:
        die_after_checkpoint(m, 2)
        with pytest.raises(DriverLost):
            LogisticRegression(regParam=0.1, **common).fit(data)
    with pytest.raises(SparkgdError, match="with other params .regParam 0.1 there, 0.2 here"):
        LogisticRegression(regParam=0.2, resume=True, **common).fit(data)
    X, y, w = logistic_data(n=700, d=6, seed=12, weights=True)
    other = to_df(spark, X, y, w, partitions=2)
    with pytest.raises(SparkgdError, match="written for other data .800 rows"):
        LogisticRegression(regParam=0.1, resume=True, **common).fit(other)
    with pytest.raises(SparkgdError, match="checkpointDir .* holds a checkpoint"):
        LogisticRegression(regParam=0.1, **common).fit(data)
    assert os.path.exists(os.path.join(directory, ckpt.META))        # nothing was lost


@pytest.mark.parametrize("mode", ["sync", "local", "async"])
def test_a_diverging_fit_names_the_iteration_and_keeps_its_last_checkpoint(spark, tmp_path,
                                                                           mode):
    from sparkgd import LinearRegression

    X, y, _ = regression_data(n=300, d=4, seed=2)
    df = to_df(spark, X * 100.0, y, partitions=2)
    directory = str(tmp_path / "ck")
    est = LinearRegression(optimizer="sgd", stepSize=5.0, maxIter=200, tol=0, mode=mode,
                           localSteps=2, checkpointDir=directory, checkpointInterval=1)
    with pytest.raises(SparkgdError, match=r"is (inf|nan) at iteration \d+: the fit diverged"
                                           r".*checkpoint of iteration \d+ in .* stays"):
        est.fit(df)
    meta = json.load(open(os.path.join(directory, ckpt.META)))
    assert meta["iteration"] >= 1 and all(np.isfinite(meta["objectiveHistory"]))


def test_checkpoint_params_are_checked_up_front():
    from sparkgd import LinearRegression

    with pytest.raises(SparkgdError, match="checkpointInterval must be >= 1, or -1"):
        LinearRegression(checkpointInterval=0)._validate()
    with pytest.raises(SparkgdError, match="resume needs checkpointDir"):
        LinearRegression(resume=True)._validate()


def test_a_replay_refuses_a_point_other_than_the_logged_one():
    replay = ckpt.Replay(([ckpt.point_hash(np.zeros(2))], [False], [1.0],
                          [np.array([[0.5, 0.5]])]))
    fun = replay.wrap(lambda x: (2.0, np.ones(2)))
    f, g = fun(np.zeros(2))
    assert f == 1.0 and np.array_equal(g, [0.5, 0.5]) and not replay.replaying
    assert fun(np.ones(2))[0] == 2.0                       # past the log: computed
    replay = ckpt.Replay(([ckpt.point_hash(np.zeros(2))], [False], [1.0],
                          [np.array([[0.5, 0.5]])]))
    with pytest.raises(SparkgdError, match="does not replay"):
        replay.wrap(lambda x: (2.0, np.ones(2)))(np.ones(2))


def test_what_a_fit_kept_is_used_only_on_blocks_of_the_same_data():
    class Facts:
        def __init__(self, rows, weight):
            self.infos = [{"wsum": weight, "ymin": 0.0, "ymax": 1.0, "nnz": rows * 3}]
            self.num_rows, self.num_features = rows, 3

        def label_weights(self):
            return None

    recovery = ckpt.Recovery()
    assert recovery.vouch(Facts(100, 50.0))
    recovery.replay, recovery.iteration = object(), 7
    # the same data grouped otherwise: its sums differ in the last bits only
    assert recovery.vouch(Facts(100, 50.0 * (1 + 1e-15))) and recovery.iteration == 7
    assert not recovery.vouch(Facts(99, 49.5))         # a task's input had ended early
    assert recovery.replay is None and recovery.iteration == 0
