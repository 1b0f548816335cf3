"""The command line: end to end on data/sample, and every error path -> one line, exit 2."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sparkgd import cli

from conftest import ROOT

SAMPLE = os.path.join(ROOT, "data", "sample")


def run_cli(capsys, *args):
    code = cli.main(list(args), default_data=SAMPLE)
    out, err = capsys.readouterr()
    return code, out, err


def test_trains_on_the_sample_in_process(spark, tmp_path, capsys):
    out_dir = tmp_path / "model"
    code, out, err = run_cli(capsys, "--output", str(out_dir), "--max-iter", "20")
    assert code == 0, err
    assert "sparkgd: iter    1  objective" in out and "saved to" in out
    meta = json.load(open(out_dir / "metadata.json"))
    assert meta["numFeatures"] == 10 and meta["loss"] == "logistic"
    assert 1 <= meta["summary"]["totalIterations"] <= 20
    # float32 block storage: the same fit to float32's precision
    code, _, err = run_cli(capsys, "--output", str(tmp_path / "m32"), "--max-iter", "20",
                           "--dtype", "float32")
    assert code == 0, err
    c64 = np.load(out_dir / "coefficients.npy")
    c32 = np.load(tmp_path / "m32" / "coefficients.npy")
    np.testing.assert_allclose(c32, c64, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("args,message", [
    (["--data", "/nonexistent"], "--data '/nonexistent': no such file or directory"),
    (["--max-iter", "-1"], "--max-iter must be >= 0 (got -1)"),
    (["--tol", "abc"], "argument --tol: expected a number, got 'abc'"),
    (["--loss", "cubic"], "argument --loss: invalid choice: 'cubic'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--label-col", "nope"], "label column 'nope' not found in --data"),
    (["--features-col", "label"], "features column 'label' in --data"),
    (["--weight-col", "features"], "weight column 'features' in --data"),
    (["--aggregation-depth", "1"], "--aggregation-depth must be >= 2"),
    (["--elastic-net-param", "1.5"], "--elastic-net-param must be in [0, 1] (got 1.5)"),
    (["--mini-batch-fraction", "0"], "--mini-batch-fraction must be in (0, 1] (got 0.0)"),
    (["--tol", "inf"], "--tol must be a finite number (got inf)"),
    (["--format", "libsvm", "--num-features", "0"], "--num-features must be >= 1 (got 0)"),
    (["--optimizer", "newton"], "unknown optimizer 'newton'; expected one of lbfgs"),
    (["--dtype", "float16"], "unknown dtype 'float16'; expected float64 or float32"),
    (["--compression", "zip"], "unknown compression 'zip'; expected none, fp16"),
    (["--compression", "fp16"], "--compression fp16 is lossy and lbfgs needs exact"),
    (["--mode", "async"], "--mode async applies each push as an sgd step"),
    (["--mode", "local", "--optimizer", "sgd", "--local-steps", "0"],
     "--local-steps must be >= 1 (got 0)"),
    (["--staleness", "x"], "argument --staleness: expected an integer, got 'x'"),
    (["--initial-model", "/nonexistent"], "--initial-model '/nonexistent': not a saved sparkgd"),
    (["--format", "libsvm", "--weight-col", "w"], "--format libsvm has only 'label'"),
    (["--format", "libsvm"], "cannot read --data"),
    (["--loss", "logistic", "--data", os.path.join(ROOT, "data", "README.md")],
     "cannot read --data"),
])
def test_errors_are_one_line_exit_2_and_write_nothing(spark, tmp_path, capsys, args, message):
    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, *args, "--output", str(out_dir))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparkgd: error: "), err
    assert message in lines[0]
    assert not out_dir.exists()


def test_labels_out_of_range_keep_the_existing_model(spark, tmp_path, capsys):
    out_dir = tmp_path / "model"
    assert run_cli(capsys, "--output", str(out_dir), "--max-iter", "3")[0] == 0
    before = (out_dir / "metadata.json").read_text()
    # squared loss on the same data works, but logistic on a real-valued label does not:
    data = tmp_path / "reg"
    from sparkgd import datagen

    datagen.write_dataset(str(data), task="regression", rows=200, features=3, partitions=2)
    code, _, err = run_cli(capsys, "--data", str(data), "--output", str(out_dir))
    assert code == 2 and "the logistic loss needs labels 0 or 1" in err
    assert (out_dir / "metadata.json").read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["model", "reg"]


def test_refuses_to_replace_a_directory_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    code, _, err = run_cli(capsys, "--output", str(tmp_path))
    assert code == 2 and "not a sparkgd model" in err
    assert (tmp_path / "precious.txt").read_text() == "keep me"


# --------------------------------------------------------------------------- spark-submit


def submit(*args, timeout=300):
    return subprocess.run([os.path.join(ROOT, "spark-submit.sh"), "--master", "local[2]",
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_spark_submit_trains_on_the_sample(tmp_path):
    out_dir = tmp_path / "model"
    r = submit("jobs/train.py", "--output", str(out_dir), "--max-iter", "30")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "sparkgd: done:" in r.stdout
    assert (out_dir / "coefficients.npy").exists()


def test_spark_submit_missing_data_is_one_line_exit_2(tmp_path):
    out_dir = tmp_path / "out"
    r = submit("jobs/train.py", "--data", "/nonexistent", "--output", str(out_dir))
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [
        "sparkgd: error: --data '/nonexistent': no such file or directory"]
    assert not out_dir.exists()


def test_every_loss_and_optimizer_option_reaches_the_estimator(spark, tmp_path, capsys):
    data = tmp_path / "multi"
    from sparkgd import datagen

    datagen.write_dataset(str(data), task="multiclass", rows=300, features=3, partitions=2,
                          classes=3)
    out = tmp_path / "m"
    code, stdout, err = run_cli(capsys, "--data", str(data), "--loss", "multinomial",
                                "--optimizer", "adam", "--step-size", "0.05", "--max-iter", "5",
                                "--reg-param", "0.01", "--elastic-net-param", "0.5",
                                "--standardization", "--compression", "qsgd:8",
                                "--mode", "local", "--local-steps", "3", "--output", str(out))
    assert code == 0, err
    meta = json.load(open(out / "metadata.json"))
    assert meta["loss"] == "multinomial" and meta["numClasses"] == 3
    p = meta["params"]
    assert (p["optimizer"], p["stepSize"], p["elasticNetParam"], p["standardization"],
            p["family"], p["compression"], p["mode"], p["localSteps"]) == \
        ("adam", 0.05, 0.5, True, "multinomial", "qsgd:8", "local", 3)
    assert meta["summary"]["mode"] == "local" and meta["summary"]["totalIterations"] == 5
    # warm start from it, with a model of the wrong width refused
    code, _, err = run_cli(capsys, "--initial-model", str(out), "--output", str(tmp_path / "x"))
    assert code == 2 and "initialModel has 3 features but the data has 10" in err


def test_libsvm_input(spark, tmp_path, capsys):
    path = tmp_path / "data.libsvm"
    rng = np.random.default_rng(0)
    lines = []
    for i in range(200):
        idx = np.sort(rng.choice(50, size=4, replace=False))
        z = sum(0.3 * (j % 5 - 2) for j in idx)
        label = int(rng.random() < 1 / (1 + np.exp(-z)))
        lines.append(f"{label} " + " ".join(f"{j + 1}:{rng.normal():.6f}" for j in idx))
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "m"
    code, _, err = run_cli(capsys, "--data", str(path), "--format", "libsvm", "--num-features",
                           "60", "--reg-param", "0.01", "--output", str(out))
    assert code == 0, err
    assert json.load(open(out / "metadata.json"))["numFeatures"] == 60


def _libsvm_lines(n=300, d=400, k=6, seed=3):
    """Sparse rows as LIBSVM lines, and the same rows as a CSR matrix and labels."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    idx = np.sort(np.stack([rng.choice(d - 1, size=k, replace=False) for _ in range(n)]),
                  axis=1)
    vals = rng.normal(size=(n, k))
    z = (vals * (idx % 7 - 3) * 0.3).sum(axis=1)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(float)
    lines = [f"{int(y[i])} " + " ".join(f"{j + 1}:{float(v)!r}" for j, v in zip(idx[i], vals[i]))
             for i in range(n)]
    X = sp.csr_matrix((vals.ravel(), idx.ravel(), np.arange(0, n * k + 1, k)),
                      shape=(n, int(idx.max()) + 1))
    return lines, X, y


def test_libsvm_is_parsed_in_the_tasks_and_matches_scipy(spark, tmp_path):
    """read_libsvm: no vectors in the JVM, width = the largest index; the fit reaches
    SciPy's optimum of the same CSR problem, on the served store and on block files."""
    import scipy.optimize as so

    import sparkgd
    from sparkgd.data import read_libsvm
    from test_distributed import numpy_objective

    lines, X, y = _libsvm_lines()
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "part-0.txt").write_text("\n".join(lines[:170]) + "\n")
    (tmp_path / "a" / "part-1.txt").write_text("# a comment\n\n" + "\n".join(lines[170:]))
    assert sparkgd.read_libsvm is read_libsvm
    df = read_libsvm(spark, str(tmp_path / "a"))
    reg = 0.01
    ref = so.minimize(lambda t: numpy_objective(t, X, y, None, "logistic", True, reg),
                      np.zeros(X.shape[1] + 1), jac=True, method="L-BFGS-B",
                      options={"maxiter": 2000, "ftol": 0, "gtol": 1e-12})
    model = sparkgd.LogisticRegression(regParam=reg, tol=1e-12, maxIter=200).fit(df)
    assert model.numFeatures == X.shape[1]
    theta = np.append(model.coefficients, model.intercept)
    f = numpy_objective(theta, X, y, None, "logistic", True, reg)[0]
    assert f - ref.fun <= 1e-10 * abs(ref.fun)
    assert model.summary.totalIterations <= 12   # the preconditioner weighs the penalty in
    wide = sparkgd.LogisticRegression(regParam=reg, maxIter=3).fit(
        read_libsvm(spark, str(tmp_path / "a"), num_features=1000))
    assert wide.numFeatures == 1000

    # transform on the same text: one row per line, the margins SciPy's, the comment and
    # blank lines null
    scored = model.transform(df).select("features", "rawPrediction", "probability",
                                        "prediction").collect()
    assert len(scored) == len(lines) + 2
    blank = [r for r in scored if not r["features"].strip() or r["features"].startswith("#")]
    assert len(blank) == 2 and all(r["prediction"] is None and r["probability"] is None
                                   for r in blank)
    got = {r["features"]: (r["rawPrediction"][1], r["prediction"]) for r in scored
           if r not in blank}
    z = X @ model.coefficients + model.intercept
    for i, line in enumerate(lines):
        margin, pred = got[line.strip()] if line.strip() in got else got[line]
        assert abs(margin - z[i]) <= 1e-9 * max(1.0, abs(z[i]))
        assert pred == float(z[i] > 0)
    svc = sparkgd.LinearSVC(maxIter=5).fit(df).transform(df).select("rawPrediction",
                                                                    "prediction").collect()
    assert sum(r["prediction"] is None and r["rawPrediction"] is None for r in svc) == 2
    multi = sparkgd.LogisticRegression(family="multinomial", maxIter=5).fit(df)
    assert sum(r["probability"] is None for r in multi.transform(df).collect()) == 2
    narrow = sparkgd.LogisticRegression(maxIter=2).fit(spark.createDataFrame(
        [([1.0, 2.0], 0.0), ([0.5, -1.0], 1.0)], "features array<double>, label double"))
    with pytest.raises(Exception, match="beyond num_features=2"):
        narrow.transform(df).collect()


def test_libsvm_bad_line_names_its_file_and_line(spark, tmp_path, capsys):
    """Even when Spark splits the file (the bad line is far past the first split)."""
    lines, _, _ = _libsvm_lines(n=300)
    lines[249] = lines[249].replace(":", "=", 1)
    path = tmp_path / "bad.libsvm"
    path.write_text("\n".join(lines) + "\n")
    key = "spark.sql.files.maxPartitionBytes"
    old = spark.conf.get(key)
    spark.conf.set(key, "4096")
    try:
        code, _, err = run_cli(capsys, "--data", str(path), "--format", "libsvm",
                               "--output", str(tmp_path / "m"))
    finally:
        spark.conf.set(key, old)
    assert code == 2
    assert f"{path}, line 250: " in err and err.count("\n") == 1, err
    assert not (tmp_path / "m").exists()
    good = tmp_path / "good.libsvm"
    good.write_text("\n".join(_libsvm_lines(n=20)[0]) + "\n")
    code, _, err = run_cli(capsys, "--data", str(good), "--format", "libsvm",
                           "--num-features", "5", "--output", str(tmp_path / "m"))
    assert code == 2 and ", line 1: " in err and "num_features=5" in err, err


def test_output_to_a_file_uri_and_a_second_path_round_trip(spark, tmp_path, capsys):
    """--output takes Hadoop-FS URIs (file: here); the same model saved to a plain path
    loads the same, and either feeds jobs/predict.py, whose Parquet matches transform."""
    import sparkgd

    uri = "file://" + str(tmp_path / "a" / "model")
    code, out, err = run_cli(capsys, "--output", uri, "--max-iter", "15",
                             "--plot", str(tmp_path / "fit.png"), "--log-level", "WARNING")
    assert code == 0, err
    assert "sparkgd: iter" not in out                      # --log-level WARNING
    assert "sparkgd: sparkgd:" not in out
    assert "training metrics: areaUnderROC" in out and "accuracy" in out
    assert open(tmp_path / "fit.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    a = sparkgd.load_model(uri)
    code, _, err = run_cli(capsys, "--output", str(tmp_path / "b"), "--max-iter", "15")
    assert code == 0, err
    b = sparkgd.load_model(str(tmp_path / "b"))
    np.testing.assert_array_equal(a.coefficients, b.coefficients)
    meta = json.load(open(tmp_path / "a" / "model" / "metadata.json"))
    assert 0.5 < meta["summary"]["metrics"]["auc"] <= 1.0
    assert sparkgd.LogisticRegressionModel.load(uri).summary.areaUnderROC == \
        pytest.approx(a.summary.areaUnderROC)

    scored = str(tmp_path / "scored")
    assert cli.predict_main(["--model", uri, "--data", SAMPLE, "--output", scored]) == 0
    out, err = capsys.readouterr()
    assert "rows scored" in out, err
    got = spark.read.parquet(scored).orderBy("label", "prediction").toPandas()
    want = a.transform(spark.read.parquet(SAMPLE)).orderBy("label", "prediction").toPandas()
    np.testing.assert_array_equal(got["prediction"], want["prediction"])
    assert isinstance(got["probability"][0][0], float)     # arrays, not vectors
    assert cli.predict_main(["--model", uri, "--data", SAMPLE, "--output", scored]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "fit.png", "scored"]   # no temp dirs


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    text = text[text.index("options:"):]         # past the usage lines
    for option, default in [("--max-iter", "100"), ("--tol", "1e-06"), ("--reg-param", "0.0"),
                            ("--optimizer", "lbfgs"), ("--output", "out/model"),
                            ("--log-level", "INFO"), ("--staleness", "2")]:
        block = text[text.index("  " + option):]
        assert f"(default: {default})" in " ".join(block.split()[:40]), option


def test_a_missing_module_on_the_executors_names_it_and_the_fix():
    from sparkgd.errors import first_line

    e = RuntimeError("An exception was thrown from the Python worker:\nTraceback (most recent "
                     "call last):\n  File \"x.py\", line 1\nModuleNotFoundError: No module "
                     "named 'pyarrow'")
    msg = first_line(e)
    assert "no module 'pyarrow'" in msg and "PYSPARK_PYTHON" in msg
    e = RuntimeError("An exception was thrown from the Python worker:\nTraceback\n"
                     "ValueError: the real cause")
    assert first_line(e).endswith("ValueError: the real cause")


def test_workers_out_of_memory_end_in_one_error_line(tmp_path):
    """spark.executor.pyspark.memory below what a Python worker needs even to stream (the
    interpreter with NumPy, BLAS and Arrow alone takes ~350 MiB of address space): the
    served build fails, the block files' build fails too, and the job ends with exit 2,
    one sparkgd line naming the memory the workers had and the setting to raise, and no
    model. (Spark's own ERROR log of the failed tasks stays on stderr above it.)"""
    out_dir = tmp_path / "out"
    r = submit("--conf", "spark.executor.pyspark.memory=300m", "jobs/train.py", "--output",
               str(out_dir))
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    ours = [line for line in r.stderr.splitlines() if line.startswith("sparkgd: error:")]
    assert len(ours) == 1, r.stderr[-3000:]
    assert "out of memory" in ours[0] and "300 MiB" in ours[0], ours
    assert ours[0].endswith("raise spark.executor.pyspark.memory"), ours
    assert "Traceback" not in r.stdout
    assert not out_dir.exists()
