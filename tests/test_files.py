"""The file store (memory-mapped blocks): the same numbers as NumPy and as the served
store, recovery, cleanup."""
import os

import numpy as np
import pytest

import sparkgd
from sparkgd.errors import SparkgdError
from sparkgd import kernels
from sparkgd.data import resolve_input
from sparkgd.engine import Engine, files
from sparkgd.modes.sync import DistributedObjective
from sparkgd.penalties import Penalty

from conftest import logistic_data, to_df


def executor_root(spark):
    sc = spark.sparkContext
    return sc.parallelize([0], 1).map(lambda _: files.local_root()).collect()[0]


def objective(engine, layout, loss="logistic", kind="workers"):
    """``kind``: how the engine runs the file store's passes (both work on the same blocks)."""
    engine.kind = kind
    return DistributedObjective(engine, kernels.make_loss(loss), layout, Penalty(layout, 0.05))


def open_files(df, spec=None, **kw):
    return Engine.open(df, spec or resolve_input(df.schema), store="files", **kw)


def handle_paths(engine):
    handles = engine._store._handles.map(lambda p: p[1]).collect()
    return [h[k] for h in handles for k in ("X", "y", "w", "data", "indices", "indptr")
            if h.get(k)]


@pytest.fixture(scope="module")
def data(spark):
    X, y, w = logistic_data(n=400, d=6, seed=40, weights=True)
    return X, y, w, to_df(spark, X, y, w, partitions=3)


def test_files_and_served_stores_give_numpys_objective(spark, data):
    from test_distributed import numpy_objective

    X, y, w, df = data
    spec = resolve_input(df.schema, weight_col="weight")
    layout = kernels.Layout(6, 1, True)
    theta = np.random.default_rng(0).normal(size=layout.size)
    results = {}
    for store, kinds in (("files", ("workers", "jobs")), ("served", ("served",))):
        with Engine.open(df, spec, store=store) as engine:
            assert engine._store.kind == store
            for kind in kinds:
                results[store, kind] = objective(engine, layout, kind=kind)(theta)
    fm, gm = numpy_objective(theta, X, y, w, "logistic", True, 0.05)
    assert len(results) == 3
    for f, g in results.values():
        assert abs(f - fm) <= 1e-12 * abs(fm)
        np.testing.assert_allclose(g, gm, rtol=1e-12, atol=1e-15)


def test_float32_storage_is_exact_on_the_rounded_data(spark, data):
    """dtype=float32 stores X rounded to float32 (half the bytes), multiplies chunks in
    float32 and sums in float64: the objective is NumPy's on the rounded features to
    float32's rounding of the products, for both engines."""
    from test_distributed import numpy_objective

    X, y, w, df = data
    spec = resolve_input(df.schema, weight_col="weight")
    layout = kernels.Layout(6, 1, True)
    theta = np.random.default_rng(1).normal(size=layout.size)
    X32 = X.astype(np.float32).astype(np.float64)
    assert np.abs(X32 - X).max() > 0  # the rounding is visible at this precision
    f_ref, g_ref = numpy_objective(theta, X32, y, w, "logistic", True, 0.05)
    with open_files(df, spec, dtype="float32") as engine:
        handles = engine._store._handles.map(lambda p: p[1]).collect()
        assert {h["x_dtype"] for h in handles} == {"float32"}
        assert sum(os.path.getsize(h["X"]) for h in handles) == X.size * 4
        kinds = engine._store.rdd.map(lambda b: b[0].dtype.name).collect()
        assert set(kinds) == {"float32"}
        for kind in ("workers", "jobs"):
            f, g = objective(engine, layout, kind=kind)(theta)
            assert abs(f - f_ref) <= 1e-6 * abs(f_ref)
            np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5 * np.abs(g_ref).max())
    big = to_df(spark, np.r_[X[:5], [[1e39] * 6]], np.r_[y[:5], 1.0], partitions=1)
    with pytest.raises(SparkgdError, match="beyond float32's range"):
        open_files(big, dtype="float32")


def test_blocks_are_memory_mapped(spark, data):
    df = data[3]
    with open_files(df) as engine:
        kinds = engine._store.rdd.map(lambda b: type(b[0]).__name__).collect()
    assert set(kinds) == {"memmap"}


@pytest.mark.parametrize("kind", ["workers", "jobs"])
def test_deleted_files_are_rebuilt_and_give_the_same_numbers(spark, data, kind):
    """``jobs``: the next pass's tasks find the files gone. ``workers``: the running
    serving tasks keep their mapped files; a restarted session finds them gone."""
    X, y, w, df = data
    layout = kernels.Layout(6, 1, True)
    theta = np.linspace(-1, 1, layout.size)
    with open_files(df, resolve_input(df.schema, weight_col="weight")) as engine:
        obj = objective(engine, layout, kind=kind)
        before = obj(theta)
        paths = handle_paths(engine)
        assert paths and all(os.path.exists(p) for p in paths)  # local mode: same machine
        for p in paths[::2]:
            os.remove(p)
        engine._store.close_session()
        after = obj(theta)
        assert engine._store.rebuilds == 1
        assert all(os.path.exists(p) for p in handle_paths(engine))
    assert after[0] == before[0]
    np.testing.assert_array_equal(after[1], before[1])


@pytest.mark.parametrize("kind", ["workers", "jobs"])
def test_dropped_cache_entries_are_recomputed_through_lineage(spark, data, kind):
    df = data[3]
    layout = kernels.Layout(6, 1, True)
    theta = np.linspace(-1, 1, layout.size)
    with open_files(df) as engine:
        obj = objective(engine, layout, kind=kind)
        before = obj(theta)
        engine._store._handles.unpersist(blocking=True)  # as if an executor were lost
        engine._store.close_session()                    # ... with its serving task
        after = obj(theta)
        assert engine._store.rebuilds == 0
    assert after[0] == before[0]


def test_fit_leaves_no_files_behind(spark, data):
    root = executor_root(spark)
    before = {p for p in os.listdir(root) if p.startswith("sparkgd-")}
    sparkgd.LogisticRegression(maxIter=3).fit(data[3])
    after = {p for p in os.listdir(root) if p.startswith("sparkgd-")}
    assert after == before == set()


def test_failed_fit_leaves_no_files_behind(spark):
    root = executor_root(spark)
    df = spark.createDataFrame([([1.0], 0.0), ([2.0], 0.5)], "features array<double>, label double")
    with pytest.raises(sparkgd.SparkgdError):
        sparkgd.LogisticRegression().fit(df)
    assert not [p for p in os.listdir(root) if p.startswith("sparkgd-")]


def test_streamed_block_files_roundtrip(tmp_path, monkeypatch):
    """Batches are appended to one block; dense and CSR read back exactly."""
    import json

    import pyarrow as pa

    from sparkgd.data import InputSpec

    monkeypatch.setenv("SPARK_LOCAL_DIRS", str(tmp_path))
    rng = np.random.default_rng(1)
    X = rng.normal(size=(30, 4))
    y = rng.integers(0, 2, 30).astype(float)
    w = rng.uniform(0.5, 2, 30)

    def batch(lo, hi):
        return pa.RecordBatch.from_pydict({
            "features": pa.array(X[lo:hi].tolist(), type=pa.list_(pa.float64())),
            "label": pa.array(y[lo:hi]), "weight": pa.array(w[lo:hi])})

    spec = InputSpec("array", ("features",), "label", "weight")
    rows = list(files.write_arrow_partition(iter([batch(0, 10), batch(10, 30)]), spec,
                                                 "t1"))
    assert len(rows) == 1
    info = json.loads(rows[0].column("info")[0].as_py())
    handle = json.loads(rows[0].column("handle")[0].as_py())
    assert info["n"] == 30 and abs(info["wsum"] - w.sum()) < 1e-12
    X2, y2, w2 = files.open_block(handle)
    np.testing.assert_array_equal(X2, X)
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(w2, w)
    assert isinstance(X2, np.memmap)
    os.remove(handle["y"])
    with pytest.raises(files.BlockMissing, match=files.MISSING_MARKER):
        files.open_block(handle)


def test_sparse_batches_stream_into_csr(tmp_path, monkeypatch):
    import json

    import pyarrow as pa
    import scipy.sparse as sp

    from sparkgd.data import InputSpec

    monkeypatch.setenv("SPARK_LOCAL_DIRS", str(tmp_path))
    S = sp.random(40, 500, density=0.01, format="csr", random_state=3)

    def batch(lo, hi):
        rows = S[lo:hi]
        arr = pa.StructArray.from_arrays(
            [pa.array([0] * (hi - lo), pa.int8()), pa.array([500] * (hi - lo), pa.int32()),
             pa.array([rows[i].indices.tolist() for i in range(hi - lo)], pa.list_(pa.int32())),
             pa.array([rows[i].data.tolist() for i in range(hi - lo)], pa.list_(pa.float64()))],
            names=["type", "size", "indices", "values"])
        return pa.RecordBatch.from_arrays([arr, pa.array(np.zeros(hi - lo))],
                                          names=["features", "label"])

    spec = InputSpec("vector", ("features",), "label", None)
    rows = list(files.write_arrow_partition(iter([batch(0, 15), batch(15, 40)]), spec,
                                                 "t2"))
    handle = json.loads(rows[0].column("handle")[0].as_py())
    X2, _, w2 = files.open_block(handle)
    assert sp.issparse(X2) and w2 is None
    assert (X2 != S).nnz == 0


# ------------------------------------------------------------ streamed passes (windows)


def _write_block(tmp_path, X, y, w, dtype="float64"):
    import scipy.sparse as sp
    from sparkgd.data.facts import block_info

    fmt = "csr" if sp.issparse(X) else "dense"
    b = files._BlockFile(str(tmp_path), fmt, X.shape[1], w is not None, dtype)
    for s in range(0, y.shape[0], 7000):       # appended batch by batch, as a build does
        b.add(X[s:s + 7000], y[s:s + 7000], None if w is None else w[s:s + 7000],
              block_info(X[s:s + 7000], y[s:s + 7000], None if w is None else w[s:s + 7000]))
    return b.close()[1]


@pytest.mark.parametrize("storage", ["float64", "float32", "csr"])
def test_streamed_windows_are_the_blocks_rows_and_give_their_sums(tmp_path, storage):
    import scipy.sparse as sp

    rng = np.random.default_rng(3)
    n, d = 30000, 40
    X = rng.normal(size=(n, d))
    y = (rng.random(n) < 0.4).astype(float)
    w = rng.uniform(0.5, 2, size=n)
    if storage == "csr":
        X[np.abs(X) < 1.2] = 0.0
        X = sp.csr_matrix(X)
    handles = [_write_block(tmp_path / "a", X, y, w, "float32" if storage == "float32"
                            else "float64"),
               _write_block(tmp_path / "b", X[:5000], y[:5000], None)]
    mapped = [files.open_block(h) for h in handles]
    # dense: 4.5 MiB, two kernel chunks of these rows a window; CSR: 256 KiB
    window = (1 << 18) if storage == "csr" else (9 << 19)
    streamed = files.Streamed(handles, window)
    # every window maps about ``window`` bytes at most (a whole kernel chunk at least),
    # and the windows are the blocks' rows, in order
    pieces = list(streamed)
    assert len(pieces) >= 3
    for X_, y_, w_ in pieces:
        size = X_.data.nbytes + X_.indices.nbytes if sp.issparse(X_) else X_.nbytes
        rows = kernels.chunk_rows(d, X_.dtype.itemsize) if not sp.issparse(X_) else 0
        assert size + 16 * y_.shape[0] <= max(window, rows * (d * X_.dtype.itemsize + 16)) \
            * 1.05
    np.testing.assert_array_equal(np.concatenate([p[1] for p in pieces if p.block == 0]), y)
    first = [p[0] for p in pieces if p.block == 0]
    whole = sp.vstack(first).toarray() if storage == "csr" else np.vstack(first)
    np.testing.assert_array_equal(whole, mapped[0][0].toarray() if storage == "csr"
                                  else mapped[0][0])
    # the kernels over the windows: the sums over the blocks mapped whole -- a full pass,
    # a mini-batch (the block's own sample, windows taking their part) and threads
    loss, layout = kernels.make_loss("logistic"), kernels.Layout(d, 1, True)
    theta = rng.normal(size=layout.size) * 0.1
    # (float32 products round with the chunks' rows: a window's last chunk may hold
    # other rows than the block's)
    rtol = 1e-5 if storage == "float32" else 1e-12
    # (dense windows are the block's own kernel chunks: a lighter pass draws the same ones)
    lighter = [] if storage == "csr" else [{"chunks": (0.5, 7, 3, 0)}]
    for kw in [{}, {"sample": (0.3, 7, 2, 1)}, {"threads": 2}] + lighter:
        np.testing.assert_allclose(kernels.partition_sums(streamed, theta, loss, layout, **kw),
                                   kernels.partition_sums(mapped, theta, loss, layout, **kw),
                                   rtol=rtol, atol=1e-9)
    np.testing.assert_allclose(kernels.read_sums(streamed, 2), kernels.read_sums(mapped, 2),
                               rtol=1e-9)


def test_a_task_streams_when_mapping_its_blocks_fails_for_memory(tmp_path, monkeypatch):
    import errno

    rng = np.random.default_rng(4)
    h = _write_block(tmp_path, rng.normal(size=(100, 3)), np.ones(100), None)
    pairs = [({"part": 0, "seq": 0, "n": 100}, h)]
    assert isinstance(files._open_partition(pairs), list)
    assert isinstance(files._open_partition(pairs, window=1 << 20), files.Streamed)

    def no_memory(handle):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(files, "open_block", no_memory)
    assert isinstance(files._open_partition(pairs), files.Streamed)
    (key, blocks), = files._open_keyed(pairs)
    assert key == (0, 0, 100) and isinstance(blocks, files.Streamed)


def test_memory_settings_choose_streaming():
    assert files.memory_bytes("700m") == 700 << 20
    assert files.memory_bytes("2g") == 2 << 30
    assert files.memory_bytes("1024") == 1 << 30          # MiB without a unit, as Spark's
    assert files.memory_bytes("512MB") == 512 << 20
    for bad in ("", "x", "-1m"):
        with pytest.raises(ValueError):
            files.memory_bytes(bad)


@pytest.fixture(scope="module")
def wide(spark):
    """20,000 x 50 dense rows (blocks of several kernel chunks, so several windows) and
    2,000 of them as sparse vectors 5,000 wide (wider than a vector read as an array:
    CSR blocks)."""
    from pyspark.ml.linalg import Vectors

    X, y, w = logistic_data(n=20000, d=50, seed=41, weights=True)
    X[np.abs(X) < 1.0] = 0.0
    rows = [(Vectors.sparse(5000, {100 * int(j): float(X[i, j]) for j in np.flatnonzero(X[i])}),
             float(y[i]), float(w[i])) for i in range(2000)]
    sparse = spark.createDataFrame(rows, ["features", "label", "weight"]).repartition(2)
    return to_df(spark, X, y, w, partitions=2).cache(), sparse.cache()


STREAMED_FITS = {
    "lbfgs": dict(regParam=0.01, tol=1e-10),
    "sgd-minibatch": dict(optimizer="sgd", stepSize=0.5, miniBatchFraction=0.5, maxIter=15),
    "local": dict(mode="local", optimizer="sgd", stepSize=0.3, localSteps=3, maxIter=5),
    "sparse": dict(regParam=0.01, tol=1e-10),
}


@pytest.mark.parametrize("case", list(STREAMED_FITS))
def test_a_streamed_fit_is_the_fit_over_mapped_files(spark, wide, case):
    """spark.sparkgd.blockMemory below a task's blocks: the passes map windows of the
    block files (summary.engine says so) and give the fit over the files mapped whole."""
    df = wide[1] if case == "sparse" else wide[0]
    est = sparkgd.LogisticRegression(weightCol="weight", **STREAMED_FITS[case])
    spark.conf.set("spark.sparkgd.store", "files")
    try:
        mapped = est.fit(df)
        spark.conf.set("spark.sparkgd.blockMemory", "64k")
        streamed = est.fit(df)
    finally:
        spark.conf.unset("spark.sparkgd.store")
        spark.conf.unset("spark.sparkgd.blockMemory")
    assert mapped.summary.engine == "files, sealed"
    assert streamed.summary.engine == "files, streamed, sealed"
    np.testing.assert_allclose(streamed.summary.objectiveHistory,
                               mapped.summary.objectiveHistory, rtol=1e-10)
    np.testing.assert_allclose(streamed.coefficients, mapped.coefficients, rtol=1e-8,
                               atol=1e-10)


def test_a_bad_block_memory_setting_is_one_line(spark, wide):
    spark.conf.set("spark.sparkgd.blockMemory", "lots")
    try:
        with pytest.raises(SparkgdError, match="spark.sparkgd.blockMemory must be a size"):
            sparkgd.LogisticRegression(maxIter=2).fit(wide[0])
    finally:
        spark.conf.unset("spark.sparkgd.blockMemory")


def test_a_workers_memory_limit_chooses_streaming():
    """spark.executor.pyspark.memory over the executor's cores is each Python worker's
    limit; a task whose blocks exceed half of it streams them, in windows of a quarter
    (at most 32 MiB)."""

    class Context:
        def __init__(self, master, conf):
            self.master, self._conf = master, conf

        def getConf(self):
            return self._conf

    infos = [{"part": p, "seq": 0, "n": 500_000, "d": 100, "nnz": 50_000_000}
             for p in range(4)]                     # 4 x 400 MB of float64 rows
    parents = [[0, 1], [2, 3]]                      # two tasks, 800 MB each
    local = Context("local[2]", {"spark.executor.pyspark.memory": "700m"})
    window, note = files.stream_choice(local, infos, parents)
    assert window == files.WINDOW_BYTES and "350 MiB" in note, note
    roomy = Context("local[2]", {"spark.executor.pyspark.memory": "4g"})
    assert files.stream_choice(roomy, infos, parents)[0] == 0
    # on a cluster the setting is an executor's, shared by its cores' workers
    cluster = Context("spark://h:7077", {"spark.executor.pyspark.memory": "4g",
                                         "spark.executor.cores": "4"})
    assert files.worker_memory(cluster)[0] == 1 << 30
    assert files.stream_choice(cluster, infos, parents)[0] == files.WINDOW_BYTES
    small = Context("local[2]", {"spark.sparkgd.blockMemory": "1m"})
    assert files.stream_choice(small, infos, parents)[0] == 1 << 18
    assert files.stream_choice(Context("local[2]", {}), infos, parents) == (0, None)
