"""sparkgd.data.libsvm: LIBSVM lines (Arrow strings) -> CSR pieces. No Spark."""
import re

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp

from sparkgd.data.libsvm import LibsvmError, Parsed, parse_lines, to_csr


def reference(lines):
    """The documented format, one line at a time in plain Python."""
    labels, indptr, indices, values, line_of_row = [], [0], [], [], []
    for pos, line in enumerate(lines):
        line = line.split("#", 1)[0].strip(" \t\n\v\f\r")
        if not line:
            continue
        tokens = re.split(r"[ \t]+", line)
        labels.append(float(tokens[0]))
        for tok in tokens[1:]:
            index, value = tok.split(":")
            indices.append(int(index) - 1)
            values.append(float(value))
        indptr.append(len(indices))
        line_of_row.append(pos)
    return (np.array(labels, dtype=np.float64), np.array(indptr, dtype=np.int64),
            np.array(indices, dtype=np.int64), np.array(values, dtype=np.float64),
            np.array(line_of_row, dtype=np.int64))


def assert_same(parsed, lines):
    labels, indptr, indices, values, line_of_row = reference(lines)
    assert isinstance(parsed, Parsed)
    assert parsed.rows == len(labels) == parsed.labels.shape[0]
    assert parsed.labels.dtype == np.float64 and parsed.values.dtype == np.float64
    assert parsed.indptr.dtype == np.int64
    # bit for bit: both sides round decimal -> double correctly
    assert np.array_equal(parsed.labels.view(np.int64), labels.view(np.int64))
    assert np.array_equal(parsed.values.view(np.int64), values.view(np.int64))
    assert np.array_equal(parsed.indptr, indptr)
    assert np.array_equal(parsed.indices, indices)
    assert np.array_equal(parsed.line_of_row, line_of_row)
    assert parsed.max_index == (int(indices.max()) if indices.size else -1)
    assert parsed.indices.dtype == (np.int32 if parsed.max_index < 2**31 - 1 else np.int64)


_SEPS = [" ", " ", " ", "  ", "\t", " \t ", "\t\t"]


def _number(rng):
    x = float(rng.normal() * 10.0 ** rng.integers(-8, 9))
    kind = rng.integers(0, 12)
    if kind == 0:
        return repr(x)
    if kind == 1:
        return f"{x:.3f}"
    if kind == 2:
        return f"{x:g}"
    if kind == 3:
        return f"{x:.17e}".replace("e", "E")
    if kind == 4:
        return str(int(rng.integers(-5, 6)))
    if kind == 5:
        return str(rng.choice(["+1", "-0", "0.", ".5", "-.25", "5.", "1e-3", "4.9e-324",
                               "2.2250738585072014e-308", "1.7976931348623157e308",
                               "0.1", "123456789012345678901234567890", "007"]))
    return f"{x:.{int(rng.integers(1, 18))}g}"


def random_lines(rng, n):
    lines = []
    for _ in range(n):
        kind = rng.integers(0, 20)
        if kind == 0:
            lines.append(str(rng.choice(["", "   ", "\t", "# comment", "  #x 1:2"])))
            continue
        k = int(rng.integers(0, 15))
        idx = np.sort(rng.choice(10**6, size=k, replace=False)) + 1
        parts = [_number(rng)] + [f"{i}:{_number(rng)}" for i in idx]
        line = "".join(p + str(rng.choice(_SEPS)) for p in parts).rstrip(" \t")
        if kind == 1:
            line = " \t" + line + "  "
        elif kind == 2:
            line += " # trailing comment: 3:4"
        elif kind == 3:
            line += "\r"
        lines.append(line)
    return lines


@pytest.mark.parametrize("seed", range(4))
def test_random_lines_match_reference(seed):
    lines = random_lines(np.random.default_rng(seed), 400)
    assert_same(parse_lines(pa.array(lines, pa.string())), lines)
    assert_same(parse_lines(pa.array(lines, pa.large_string())), lines)


def test_typical_lines():
    lines = ["1 3:0.0123 17:-0.2 20:1e-3", "-1 1:4", "+1", "0 2:-0"]
    p = parse_lines(pa.array(lines))
    assert p.labels.tolist() == [1.0, -1.0, 1.0, 0.0]
    assert p.indptr.tolist() == [0, 3, 4, 4, 5]
    assert p.indices.tolist() == [2, 16, 19, 0, 1]
    assert p.values.tolist() == [0.0123, -0.2, 0.001, 4.0, -0.0]
    assert np.signbit(p.values[-1])
    assert p.max_index == 19 and p.rows == 4
    assert_same(p, lines)


def test_empty_input():
    for arr in (pa.array([], pa.string()), pa.array([], pa.large_string()),
                pa.chunked_array([], pa.string()), pa.array(["a"]).slice(1)):
        p = parse_lines(arr)
        assert p.rows == 0 and p.max_index == -1
        assert p.indptr.tolist() == [0] and p.labels.shape == (0,)
        assert p.indices.shape == (0,) and p.indices.dtype == np.int32
        assert p.values.shape == (0,) and p.line_of_row.shape == (0,)
        assert to_csr(p, 5).shape == (0, 5)


def test_blank_and_comment_lines_are_skipped():
    lines = ["", "   ", "# a comment 1:2", "\t# indented", "1 2:3 # trailing 9:9",
             "\t \r", "2 1:1#glued", "#", "3"]
    p = parse_lines(pa.array(lines))
    assert p.rows == 3
    assert p.line_of_row.tolist() == [4, 6, 8]
    assert p.labels.tolist() == [1.0, 2.0, 3.0]
    assert p.indices.tolist() == [1, 0] and p.values.tolist() == [3.0, 1.0]
    assert_same(p, lines)
    only = parse_lines(pa.array(["", "# x", "  "]))
    assert only.rows == 0 and only.indptr.tolist() == [0]


def test_tabs_and_multiple_spaces():
    lines = ["1\t2:3  \t 4:5", "  0   1:1\t\t7:2  ", "\t-1\t3:1"]
    p = parse_lines(pa.array(lines))
    assert p.indptr.tolist() == [0, 2, 4, 5]
    assert p.indices.tolist() == [1, 3, 0, 6, 2]
    assert p.values.tolist() == [3.0, 5.0, 1.0, 2.0, 1.0]
    assert_same(p, lines)


def test_lines_without_features():
    p = parse_lines(pa.array(["1", "-1 ", "2.5 1:1", "1e-3"]))
    assert p.indptr.tolist() == [0, 0, 0, 1, 1]
    assert p.labels.tolist() == [1.0, -1.0, 2.5, 0.001]
    assert p.max_index == 0


GOOD = ["1 1:0.5 3:2", "", "0 2:1"]


@pytest.mark.parametrize("bad, words", [
    ("1 2:3 4", ["'4'", "not index:value"]),
    ("1 2:3:4", ["'2:3:4'", "more than one ':'"]),
    ("1 :3", ["':3'", "missing index"]),
    ("1 2:", ["'2:'", "missing value"]),
    ("1 2:3 :", ["':'", "missing index"]),
    ("1 0:3", ["'0:3'", "index 0"]),
    ("1 000:3", ["'000:3'", "index 0"]),
    ("1 -1:3", ["'-1:3'", "positive integer"]),
    ("1 +2:3", ["'+2:3'", "positive integer"]),
    ("1 2.5:3", ["'2.5:3'", "positive integer"]),
    ("1 a:3", ["'a:3'", "positive integer"]),
    ("1 99999999999999999999:1", ["'99999999999999999999:1'", "too large"]),
    ("1 3:1 2:1", ["'2:1' after '3:1'", "ascending"]),
    ("1 3:1 3:2", ["'3:2' after '3:1'", "ascending"]),
    ("1 2:nan", ["'2:nan'", "not a finite number"]),
    ("1 2:inf", ["'2:inf'", "not a finite number"]),
    ("1 2:-inf", ["'2:-inf'", "not a finite number"]),
    ("1 2:1e999", ["'2:1e999'", "not a finite number"]),
    ("nan 2:1", ["'nan'", "label", "not a finite number"]),
    ("-Infinity", ["'-Infinity'", "label", "not a finite number"]),
    ("abc 2:1", ["'abc'", "label", "not a number"]),
    ("1,5 2:1", ["'1,5'", "label", "not a number"]),
    ("1 2:abc", ["'2:abc'", "value", "not a number"]),
    ("1 2:1,5", ["'2:1,5'", "value", "not a number"]),
    ("1 2:1\u00a03:1", ["'2:1\\xa03:1'", "more than one ':'"]),
    ("1 2:0x10", ["'2:0x10'", "not a number"]),
    ("2:1 3:4", ["does not start with a label", "'2:1 3:4'"]),
    ("1 2:3\x0b4:5", ["control character"]),
])
def test_malformed_lines(bad, words):
    lines = GOOD + [bad] + GOOD
    for arr in (pa.array(lines), pa.array(lines, pa.large_string())):
        with pytest.raises(LibsvmError) as info:
            parse_lines(arr)
        err = info.value
        assert err.line == 3, str(err)
        for w in words:
            assert w in str(err), (w, str(err))
        assert "\n" not in str(err)
        assert isinstance(err, ValueError)


def test_null_line():
    with pytest.raises(LibsvmError, match="null") as info:
        parse_lines(pa.array(["1 1:1", None, "2"]))
    assert info.value.line == 1


def test_reports_the_first_bad_line_whatever_the_check():
    # each kind is found by a later check than the one below it; the earliest line wins
    bad = {7: ("1 2:3:4", "more than one"),       # shape (regular expression)
           6: ("x 1:1", "not a number"),          # a label that is no number (cast)
           5: ("1 1:inf", "not a finite number"),
           4: ("1 0:1", "index 0"),
           3: ("1 5:1 4:1", "ascending")}
    for first in range(3, 8):
        lines = [bad[i][0] if i in bad and i >= first else "1 1:1" for i in range(10)]
        with pytest.raises(LibsvmError, match=bad[first][1]) as info:
            parse_lines(pa.array(lines))
        assert info.value.line == first
    lines[8] = None  # found first (nulls are checked first), but line 7 comes before
    with pytest.raises(LibsvmError, match="more than one") as info:
        parse_lines(pa.array(lines))
    assert info.value.line == 7


def test_bad_number_far_into_many_lines():
    lines = [f"{i % 2} {i % 7 + 1}:{i * 0.5}" for i in range(5000)]
    lines[3777] = "1 3:1.2.3"
    lines[4500] = "1 3:zz"
    with pytest.raises(LibsvmError, match=r"'3:1\.2\.3'") as info:
        parse_lines(pa.array(lines))
    assert info.value.line == 3777


def test_long_token_is_quoted_short():
    lines = ["1 1:" + "9" * 500 + "x"]
    with pytest.raises(LibsvmError) as info:
        parse_lines(pa.array(lines))
    assert len(str(info.value)) < 120 and "..." in str(info.value)
    with pytest.raises(LibsvmError) as info:
        parse_lines(pa.array(["1 " + "2:1 " * 100 + "3"]))
    assert len(str(info.value)) < 120


def test_sliced_arrays():
    lines = random_lines(np.random.default_rng(7), 60)
    for typ in (pa.string(), pa.large_string()):
        arr = pa.array(["junk 1:1:1"] * 5 + lines + ["junk"], typ)
        assert_same(parse_lines(arr.slice(5, len(lines))), lines)
        assert_same(parse_lines(arr.slice(17, 20)), lines[12:32])
    arr = pa.array(["1 1:1", "junk", "1 1:1", "1 x:1"]).slice(2)
    with pytest.raises(LibsvmError) as info:
        parse_lines(arr)
    assert info.value.line == 1


def test_chunked_arrays():
    lines = random_lines(np.random.default_rng(3), 90)
    for typ in (pa.string(), pa.large_string()):
        chunks = [pa.array(lines[:20], typ), pa.array([], typ), pa.array(lines[20:21], typ),
                  pa.array(["x"] + lines[21:70], typ).slice(1), pa.array(lines[70:], typ)]
        p = parse_lines(pa.chunked_array(chunks))
        assert_same(p, lines)
    one = pa.chunked_array([pa.array(lines)])
    assert_same(parse_lines(one), lines)
    bad = pa.chunked_array([pa.array(["1 1:1"] * 4), pa.array(["1", "", "1 2:1 1:1"])])
    with pytest.raises(LibsvmError, match="ascending") as info:
        parse_lines(bad)
    assert info.value.line == 6


def test_not_strings():
    with pytest.raises(TypeError):
        parse_lines(["1 1:1"])
    with pytest.raises(TypeError):
        parse_lines(pa.array([1, 2]))
    sv = pa.array(["1 2:3", "0"], pa.string_view())
    assert parse_lines(sv).indices.tolist() == [1]


def test_to_csr():
    lines = ["1 1:0.5 3:2", "", "0", "-1 2:1 4:-3"]
    p = parse_lines(pa.array(lines))
    X = to_csr(p, 6)
    assert sp.issparse(X) and X.format == "csr" and X.shape == (3, 6)
    assert np.array_equal(X.toarray(), [[0.5, 0, 2, 0, 0, 0], [0] * 6, [0, 1, 0, -3, 0, 0]])
    assert np.shares_memory(X.data, p.values) and np.shares_memory(X.indices, p.indices)
    assert to_csr(p, 4).shape == (3, 4)
    with pytest.raises(LibsvmError) as info:
        to_csr(p, 3)
    err = info.value
    assert err.line == 3 and "4" in str(err) and "num_features=3" in str(err)


def test_int64_indices():
    p = parse_lines(pa.array(["1 5:1 2147483648:2", "0 1:1"]))
    assert p.indices.dtype == np.int64 and p.max_index == 2**31 - 1
    assert p.indices.tolist() == [4, 2**31 - 1, 0]
    assert p.indptr.tolist() == [0, 2, 3]
    p = parse_lines(pa.array(["1 2147483647:1"]))
    assert p.indices.dtype == np.int32 and p.max_index == 2**31 - 2
    big = parse_lines(pa.array(["1 9007199254740991:1"]))
    assert big.indices.tolist() == [2**53 - 2] and big.indices.dtype == np.int64
    chunked = parse_lines(pa.chunked_array([pa.array(["1 3:1"]), pa.array(["1 4000000000:1"])]))
    assert chunked.indices.dtype == np.int64 and chunked.indices.tolist() == [2, 3999999999]
    X = to_csr(chunked, 4 * 10**9)
    assert X.shape == (2, 4 * 10**9) and X[1, 3999999999] == 1.0
