"""Recovery end to end through ``spark-submit`` (issue 14): a driver SIGKILLed mid-fit
resumes from its checkpoint to the uninterrupted model; injected first-attempt failures
give the same model.

(No speculation case here: Spark never launches a speculative copy on a host where an
attempt of the task runs -- TaskSetManager's ``hasAttemptOnHost`` -- and local mode is one
host. Measured with the event log: the sample fit with ``spark.speculation=true``,
interval 100 ms, multiplier 1.1, quantile 0.1 on ``local[2]`` started 3 tasks, none
speculative. A case that cannot see a speculative attempt would pass with speculation
off; it needs executors on two hosts.)"""
import json
import os
import signal
import subprocess
import time

import numpy as np

from conftest import ROOT

SAMPLE = os.path.join(ROOT, "data", "sample")
FIT = ["--optimizer", "gd", "--reg-param", "0.01", "--max-iter", "40", "--tol", "0"]


def reference(tmp_path, capsys):
    """The uninterrupted model (in this process's session: the same arithmetic)."""
    from sparkgd import cli

    out = tmp_path / "reference"
    assert cli.main([*FIT, "--output", str(out)], default_data=SAMPLE) == 0
    capsys.readouterr()
    return load(out)


def load(path):
    return (np.load(os.path.join(path, "coefficients.npy")),
            np.load(os.path.join(path, "intercept.npy")),
            json.load(open(os.path.join(path, "metadata.json")))["summary"])


def submit(*args, master="local[2]", conf=(), **kw):
    cmd = [os.path.join(ROOT, "spark-submit.sh"), "--master", master]
    for c in conf:
        cmd += ["--conf", c]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return cmd + ["jobs/train.py", *args], env


def test_a_driver_killed_mid_fit_resumes_to_the_uninterrupted_model(spark, tmp_path, capsys):
    want = reference(tmp_path, capsys)
    ck, first, second = tmp_path / "ck", tmp_path / "first", tmp_path / "second"
    saving = ["--checkpoint-dir", str(ck), "--checkpoint-interval", "5"]
    # task 0 takes 200 times as long (a few ms a pass become a few tenths of a second),
    # so the kill lands mid-fit
    cmd, env = submit(*FIT, *saving, "--output", str(first),
                      conf=["spark.sparkgd.testing.slowTask=0:200"])
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen, deadline = [], time.monotonic() + 240
    try:
        for line in proc.stdout:
            seen.append(line)
            if "iter   12 " in line:        # the checkpoint of iteration 10 is written
                os.killpg(proc.pid, signal.SIGKILL)
                break
            assert time.monotonic() < deadline, "".join(seen[-20:])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(60)
    assert any("iter   12 " in s for s in seen), "".join(seen[-30:])
    assert not first.exists()                               # nothing half-written
    assert json.load(open(ck / "checkpoint.json"))["iteration"] == 10
    cmd, env = submit(*FIT, *saving, "--resume", "--output", str(second))
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "sparkgd: resumed from iteration 10" in r.stdout
    coef, icpt, summary = load(second)
    np.testing.assert_allclose(coef, want[0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(icpt, want[1], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(summary["objectiveHistory"], want[2]["objectiveHistory"],
                               rtol=1e-9)
    assert not (ck / "checkpoint.json").exists()


def test_injected_failures_give_the_same_model(spark, tmp_path, capsys):
    """The first attempt of every task sparkgd runs fails (``local[2,4]`` retries it):
    the served build gives way to the file store, whose tasks are retried and
    reconnect."""
    want = reference(tmp_path, capsys)
    for name, master, conf in (("injected", "local[2,4]",
                                ["spark.sparkgd.testing.failFirstAttempt=true"]),):
        out = tmp_path / name
        cmd, env = submit(*FIT, "--output", str(out), master=master, conf=conf)
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, name + r.stdout[-3000:] + r.stderr[-3000:]
        coef, icpt, summary = load(out)
        np.testing.assert_allclose(coef, want[0], rtol=1e-9, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(icpt, want[1], rtol=1e-9, atol=1e-12, err_msg=name)
        if name == "injected":
            assert "failed on purpose" in r.stdout + r.stderr
