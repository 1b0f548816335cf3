"""sparkgd.datagen: Parquet and LIBSVM writers (pure), and one LIBSVM fit on Spark."""
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from sparkgd import datagen

TASKS = ("binary", "regression", "multiclass")


def _read_parquet(path):
    files = sorted(f for f in os.listdir(path) if f.endswith(".parquet"))
    return files, [pq.read_table(os.path.join(path, f)) for f in files]


def _parse_libsvm_file(name):
    """One file -> list of (label text, [index ints], [value texts]), plain Python."""
    rows = []
    with open(name, encoding="ascii") as f:
        text = f.read()
    assert text == "" or text.endswith("\n")
    for line in text.splitlines():
        label, *tokens = line.split(" ")
        pairs = [t.split(":") for t in tokens]
        assert all(len(p) == 2 for p in pairs), line
        rows.append((label, [int(i) for i, _ in pairs], [v for _, v in pairs]))
    return rows


def _libsvm_files(path):
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".libsvm"))


def _to_csr(path, d):
    """All part files of a LIBSVM data set -> (CSR X with 0-based indices, y)."""
    indptr, indices, values, labels = [0], [], [], []
    for name in _libsvm_files(path):
        for label, idx, vals in _parse_libsvm_file(name):
            labels.append(float(label))
            indices.extend(i - 1 for i in idx)
            values.extend(float(v) for v in vals)
            indptr.append(len(indices))
    X = sp.csr_matrix((np.array(values), np.array(indices, dtype=np.int64),
                       np.array(indptr, dtype=np.int64)), shape=(len(labels), d))
    return X, np.array(labels)


def _no_temp_dirs(parent):
    return not [f for f in os.listdir(parent) if ".tmp-" in f]


# ----------------------------------------------------------------------------
# write_dataset (Parquet)
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_write_dataset_shapes_labels_and_determinism(tmp_path, task):
    kw = dict(task=task, rows=101, features=3, partitions=3, classes=4, seed=11, weights=True)
    info = datagen.write_dataset(tmp_path / "a", **kw)
    datagen.write_dataset(tmp_path / "b", **kw)
    files, tables = _read_parquet(tmp_path / "a")
    assert files == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [t.num_rows for t in tables] == [34, 34, 33]
    assert info["files"] == [os.path.join(str(tmp_path / "a"), f) for f in files]
    for t in tables:
        assert t.column_names == ["features", "label", "weight"]
        feats = t.column("features").to_pylist()
        assert all(len(r) == 3 for r in feats)
        y = np.array(t.column("label").to_pylist())
        w = np.array(t.column("weight").to_pylist())
        assert np.all((w >= 0.5) & (w < 2.0))
        if task == "binary":
            assert set(np.unique(y)) <= {0.0, 1.0}
        elif task == "multiclass":
            assert set(np.unique(y)) <= {0.0, 1.0, 2.0, 3.0}
        else:
            assert np.all(np.isfinite(y))
    coef, intercept = datagen.true_model(task, 3, 4, 11)
    assert np.array_equal(info["coefficients"], coef)
    assert np.shape(coef) == ((4, 3) if task == "multiclass" else (3,))
    meta = json.loads(tables[0].schema.metadata[datagen.METADATA_KEY])
    assert meta["task"] == task and np.allclose(meta["coefficients"], coef)
    # Same arguments, same values; another seed, other values.
    _, again = _read_parquet(tmp_path / "b")
    assert all(a.equals(b) for a, b in zip(tables, again))
    datagen.write_dataset(tmp_path / "c", **dict(kw, seed=12))
    _, other = _read_parquet(tmp_path / "c")
    assert not tables[0].equals(other[0])


def test_write_dataset_columns_format(tmp_path):
    datagen.write_dataset(tmp_path / "d", rows=10, features=4, partitions=2,
                          features_format="columns")
    _, tables = _read_parquet(tmp_path / "d")
    assert tables[0].column_names == ["x0", "x1", "x2", "x3", "label"]
    assert sum(t.num_rows for t in tables) == 10


def test_write_dataset_refuses_to_overwrite(tmp_path):
    out = tmp_path / "d"
    datagen.write_dataset(out, rows=20, features=2, partitions=1, seed=1)
    before = (out / "part-00000.parquet").read_bytes()
    with pytest.raises(FileExistsError):
        datagen.write_dataset(out, rows=20, features=2, partitions=1, seed=2)
    assert (out / "part-00000.parquet").read_bytes() == before
    datagen.write_dataset(out, rows=20, features=2, partitions=1, seed=2, overwrite=True)
    assert (out / "part-00000.parquet").read_bytes() != before
    assert _no_temp_dirs(tmp_path)


# ----------------------------------------------------------------------------
# write_libsvm
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_libsvm_rows_parse_back_exactly(tmp_path, task):
    d, k, K = 40, 7, 4
    info = datagen.write_libsvm(tmp_path / "s", task=task, rows=101, features=d, nnz_per_row=k,
                                partitions=3, classes=K, seed=5)
    files = _libsvm_files(tmp_path / "s")
    assert [os.path.basename(f) for f in files] == [
        "part-00000.libsvm", "part-00001.libsvm", "part-00002.libsvm"]
    assert info["files"] == files and info["nnz"] == 101 * k
    assert info["coefficients"].shape == ((K, d) if task == "multiclass" else (d,))
    coef, intercept = datagen.true_model(task, d, K, 5, nnz_per_row=k)
    assert np.array_equal(info["coefficients"], coef)
    sizes = []
    for fi, name in enumerate(files):
        rows = _parse_libsvm_file(name)
        sizes.append(len(rows))
        # The generator's own arrays for this file (one chunk: 34 rows * 7 values).
        assert len(rows) <= datagen.libsvm_chunk_rows(d, k)
        rng = np.random.default_rng([5, fi, 0])
        idx, vals, y = datagen._make_sparse_chunk(task, len(rows), d, k, coef, intercept, rng)
        for r, (label, indices, values) in enumerate(rows):
            assert len(indices) == k
            assert all(1 <= i <= d for i in indices)
            assert all(a < b for a, b in zip(indices, indices[1:]))  # sorted and distinct
            assert indices == [int(i) + 1 for i in idx[r]]
            assert [float(v) for v in values] == vals[r].tolist()  # exact round trip
            assert float(label) == y[r]
            if task == "binary":
                assert label in ("0", "1")
            elif task == "multiclass":
                assert label in {str(c) for c in range(K)}
            else:
                assert np.isfinite(float(label))
    assert sizes == [34, 34, 33]
    meta = json.loads((tmp_path / "s" / datagen.LIBSVM_INFO_FILE).read_text())
    assert meta["features"] == d and meta["nnz_per_row"] == k and meta["task"] == task


@pytest.mark.parametrize("d, k", [(12, 5), (10, 8), (6, 6), (2 * 10**6, 50), (1, 1)])
def test_libsvm_indices_distinct_sorted_in_range(tmp_path, d, k):
    """Both drawing schemes (rejection of repeats for k <= d/2, random keys above)."""
    datagen.write_libsvm(tmp_path / "s", rows=400, features=d, nnz_per_row=k, partitions=2)
    for name in _libsvm_files(tmp_path / "s"):
        for _, idx, _ in _parse_libsvm_file(name):
            assert len(idx) == k and len(set(idx)) == k
            assert idx == sorted(idx) and 1 <= idx[0] and idx[-1] <= d


@pytest.mark.parametrize("d, k", [(12, 5), (10, 8)])
def test_libsvm_indices_are_uniform(d, k):
    n = 20_000
    idx = datagen._row_indices(np.random.default_rng(3), n, d, k)
    counts = np.bincount(idx.ravel(), minlength=d)
    expected = n * k / d
    # Each count is Binomial(n, k/d): well within 5 standard deviations.
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))
    # Pairs are uniform too (the sets, not only the marginals): P(i, j both) = k(k-1)/(d(d-1)).
    onehot = np.zeros((n, d))
    np.put_along_axis(onehot, idx, 1.0, axis=1)
    pairs = onehot.T @ onehot
    pexp = n * k * (k - 1) / (d * (d - 1))
    off = pairs[~np.eye(d, dtype=bool)]
    assert np.all(np.abs(off - pexp) < 5 * np.sqrt(pexp))


def test_libsvm_margins_have_unit_variance():
    d, k = 100_000, 50
    coef, intercept = datagen.true_model("regression", d, seed=0, nnz_per_row=k)
    idx, vals, _ = datagen._make_sparse_chunk("regression", 4000, d, k, coef, intercept,
                                              np.random.default_rng(0))
    z = np.einsum("ij,ij->i", vals, coef[idx])
    assert abs(np.std(coef) * np.sqrt(k) - 1) < 0.02
    assert 0.9 < np.var(z) < 1.1
    assert intercept == 0.5


def test_libsvm_is_deterministic_and_refuses_to_overwrite(tmp_path):
    kw = dict(task="multiclass", rows=50, features=30, nnz_per_row=4, partitions=2, seed=9)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    datagen.write_libsvm(a, **kw)
    datagen.write_libsvm(b, **kw)
    datagen.write_libsvm(c, **dict(kw, seed=10))
    for fa, fb, fc in zip(_libsvm_files(a), _libsvm_files(b), _libsvm_files(c)):
        assert open(fa, "rb").read() == open(fb, "rb").read()
        assert open(fa, "rb").read() != open(fc, "rb").read()
    before = (a / "part-00000.libsvm").read_bytes()
    with pytest.raises(FileExistsError):
        datagen.write_libsvm(a, **dict(kw, seed=10))
    assert (a / "part-00000.libsvm").read_bytes() == before
    datagen.write_libsvm(a, **dict(kw, seed=10), overwrite=True)
    assert (a / "part-00000.libsvm").read_bytes() == (c / "part-00000.libsvm").read_bytes()
    assert _no_temp_dirs(tmp_path)


def test_libsvm_chunks_give_the_same_file_as_one_write(tmp_path, monkeypatch):
    """Several chunks per file: still whole lines, one per row, in order."""
    monkeypatch.setattr(datagen, "LIBSVM_CHUNK_VALUES", 30)  # 10 rows of 3 values per chunk
    datagen.write_libsvm(tmp_path / "s", rows=95, features=20, nnz_per_row=3, partitions=1)
    rows = _parse_libsvm_file(_libsvm_files(tmp_path / "s")[0])
    assert len(rows) == 95 and all(len(r[1]) == 3 for r in rows)


@pytest.mark.parametrize("kwargs, message", [
    (dict(nnz_per_row=11), "nnz_per_row must be <= features"),
    (dict(nnz_per_row=0), "nnz_per_row must be an integer >= 1"),
    (dict(rows=0), "rows must be"),
    (dict(task="poisson"), "task must be"),
    (dict(features=2**31), r"features must be < 2\^31"),
])
def test_libsvm_bad_arguments(tmp_path, kwargs, message):
    kw = dict(rows=5, features=10, nnz_per_row=3, partitions=1)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=message):
        datagen.write_libsvm(tmp_path / "s", **kw)
    assert not os.path.exists(tmp_path / "s") and _no_temp_dirs(tmp_path)


def test_command_line_libsvm(tmp_path, capsys):
    out = str(tmp_path / "s")
    assert datagen.main([out, "--format", "libsvm", "--rows", "30", "--features", "1k",
                         "--nnz-per-row", "9", "--partitions", "2"]) == 0
    assert "libsvm format, 9 nonzeros per row" in capsys.readouterr().out
    rows = _parse_libsvm_file(_libsvm_files(out)[0])
    assert len(rows) == 15 and all(len(r[1]) == 9 for r in rows)
    assert datagen.main([out, "--format", "libsvm"]) == 2  # exists
    # Default nnz per row: 100, capped at the number of features.
    assert datagen.main([out, "--format", "libsvm", "--features", "7", "--rows", "3",
                         "--overwrite"]) == 0
    assert all(len(r[1]) == 7 for r in _parse_libsvm_file(_libsvm_files(out)[0]))
    assert datagen.main([out + "x", "--format", "libsvm", "--weights"]) == 2
    assert datagen.main([out + "x", "--nnz-per-row", "3"]) == 2
    assert "applies only to --format libsvm" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# Spark: read the LIBSVM files and fit; compare with SciPy on the same rows.
# ----------------------------------------------------------------------------


def _logistic_objective(X, y, reg):
    n = X.shape[0]

    def f(theta):
        beta, b = theta[:-1], theta[-1]
        z = X @ beta + b
        value = np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * reg * beta @ beta
        r = (0.5 * (1.0 + np.tanh(0.5 * z)) - y) / n
        return value, np.append(X.T @ r + reg * beta, r.sum())

    return f


def test_spark_reads_libsvm_and_fit_matches_scipy(spark, tmp_path):
    from scipy.optimize import minimize

    import sparkgd

    d, reg = 50, 0.01
    path = str(tmp_path / "sparse")
    datagen.write_libsvm(path, task="binary", rows=300, features=d, nnz_per_row=5,
                         partitions=3, seed=3)
    X, y = _to_csr(path, d)
    assert X.nnz == 300 * 5

    df = spark.read.format("libsvm").option("numFeatures", str(d)).load(path)
    # Spark's reader sees exactly the doubles in the files (same rows, in any order).
    got = sorted((r.label, tuple(r.features.indices.tolist()), tuple(r.features.values.tolist()))
                 for r in df.collect())
    want = sorted((y[i], tuple(X[i].indices.tolist()), tuple(X[i].data.tolist()))
                  for i in range(X.shape[0]))
    assert got == want

    model = sparkgd.LogisticRegression(regParam=reg, tol=1e-10).fit(df)

    f = _logistic_objective(X, y, reg)
    ref = minimize(f, np.zeros(d + 1), jac=True, method="L-BFGS-B",
                   options={"maxiter": 10_000, "ftol": 1e-15, "gtol": 1e-12})
    f_ref = ref.fun
    f_model = f(np.append(model.coefficients, model.intercept))[0]
    assert abs(f_model - f_ref) / abs(f_ref) <= 1e-6
    assert abs(model.summary.objectiveHistory[-1] - f_ref) / abs(f_ref) <= 1e-6
