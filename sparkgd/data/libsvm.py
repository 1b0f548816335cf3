"""LIBSVM text lines (an Arrow string array) -> CSR pieces, with no per-line Python.

The format is Spark's (``MLUtils.loadLibSVMFile``)::

    <label> <index>:<value> <index>:<value> ...     # indices 1-based, ascending

* Each line is trimmed of ASCII whitespace; lines then empty, and lines starting
  with ``#``, are skipped (:attr:`Parsed.line_of_row` says which input line each
  row came from).
* A ``#`` anywhere starts a comment that runs to the end of the line (the SVMlight
  convention), so ``1 3:0.5 # qid`` is the row ``1 3:0.5``. Spark itself rejects
  such a line; we accept it.
* Tokens are separated by runs of spaces and tabs (other control characters inside
  a line are an error). The label is a float (``1``, ``-1``, ``+1``, ``2.5``,
  ``1e-3``); each feature is ``index:value`` with ``index`` a run of decimal digits
  (no sign: ``+3:1`` is refused, where Spark takes it) from 1 to 2**53 - 1, and
  ``value`` a float. Indices must be strictly ascending within a line (so no
  duplicates). Labels and values must be finite (``nan``, ``inf`` and overflowing
  literals like ``1e999`` are errors, where Spark would accept them). A null line
  is an error.
* Floats are parsed by Arrow's string -> float64 cast, which rounds correctly (the
  same double as Python's ``float``); it takes ``.5``, ``5.``, ``1E5``, not ``0x1p3``
  or ``1_000``.

Any bad line raises :class:`LibsvmError` with the 0-based position of the first
bad line in the input (``.line``) and a one-line message quoting the bad token
(or the start of the line).

How it is vectorized: a regular expression checks each line's shape (Arrow, RE2);
NumPy finds the separators in the bytes of all lines at once, and rewrites them so
that the label, the indices and the values of every line become adjacent strings
of one Arrow array -- a separator run before an index becomes leading zeros of
the index and its ``:`` a trailing ``.`` (``" 17:"`` -> ``"017."``) -- which a
single cast turns into float64. Finding *which* line is bad is slower, and only
happens when a check fails.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

# Characters a token cannot hold: ASCII whitespace and ':'.
_TOKEN = r"[^\t\n\v\f\r :]+"
# A trimmed line: empty, or a label and index:value features.
_LINE = rf"^({_TOKEN}([ \t]+[0-9]+:{_TOKEN})*)?$"

#: Indices from this on (1-based) are refused: float64 no longer holds every integer.
_MAX_INDEX = 2**53

_SPACE, _TAB, _COLON, _HASH, _ZERO, _DOT = 32, 9, 58, 35, 48, 46


class LibsvmError(ValueError):
    """A bad LIBSVM line: ``line`` is its 0-based position in the input array."""

    def __init__(self, line, message):
        super().__init__(message)
        self.line = int(line)
        self.message = message


@dataclass(frozen=True)
class Parsed:
    """Rows of CSR: row ``i`` has ``indices[indptr[i]:indptr[i+1]]`` (0-based, ascending)
    and the matching ``values``; it came from input line ``line_of_row[i]``."""

    labels: np.ndarray       # float64 (rows,)
    indptr: np.ndarray       # int64 (rows + 1,)
    indices: np.ndarray      # int32, or int64 when max_index >= 2**31 - 1
    values: np.ndarray       # float64 (nnz,)
    max_index: int           # largest 0-based index, -1 when there is none
    rows: int
    line_of_row: np.ndarray  # int64 (rows,)


def parse_lines(lines):
    """LIBSVM lines (``pa.StringArray`` / ``LargeStringArray``, sliced or chunked)
    -> :class:`Parsed`. Raises :class:`LibsvmError` naming the first bad line."""
    import pyarrow as pa

    if isinstance(lines, pa.ChunkedArray):
        chunks = lines.chunks
    elif isinstance(lines, pa.Array):
        chunks = [lines]
    else:
        raise TypeError(f"expected a pyarrow string array, got {type(lines).__name__}")
    parts, base = [], 0
    for chunk in chunks:
        chunk = _as_string(chunk)
        try:
            parts.append(_parse_first_error(chunk))
        except LibsvmError as e:
            raise LibsvmError(base + e.line, e.message) from None
        base += len(chunk)
    return _concat(parts, [len(c) for c in chunks])


def to_csr(parsed, num_features):
    """:class:`Parsed` -> ``scipy.sparse.csr_matrix`` of shape (rows, num_features).

    ``values`` and ``indices`` are shared, not copied (scipy converts ``indptr``, n+1
    entries, to the indices' type; and int32 indices to int64 when num_features
    or the number of non-zeros reaches 2**31). Raises :class:`LibsvmError` at the first line with an index beyond
    ``num_features``."""
    num_features = int(num_features)
    if parsed.max_index >= num_features:
        k = int(np.flatnonzero(parsed.indices >= num_features)[0])
        row = int(np.searchsorted(parsed.indptr, k, side="right")) - 1
        raise LibsvmError(
            parsed.line_of_row[row],
            f"feature index {int(parsed.indices[k]) + 1} is beyond num_features="
            f"{num_features} (indices are 1-based)")
    return sp.csr_matrix((parsed.values, parsed.indices, parsed.indptr),
                         shape=(parsed.rows, num_features))


# ----------------------------------------------------------------------------
# One Arrow array.
# ----------------------------------------------------------------------------


def _as_string(arr):
    import pyarrow as pa

    t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return arr
    if pa.types.is_string_view(t):
        return arr.cast(pa.large_string())
    raise TypeError(f"expected an array of strings, got {t}")


def _parse_first_error(arr):
    """:func:`_parse`, but an error names the *first* bad line: the checks run one
    after the other, and a later one may hold an earlier line, so a failure at
    line L is retried on the lines before L until they parse."""
    try:
        return _parse(arr)
    except LibsvmError as err:
        while err.line > 0:
            try:
                _parse(arr.slice(0, err.line))
            except LibsvmError as earlier:
                err = earlier
                continue
            break
        raise err from None


def _buffers(arr):
    """A string array -> (offsets as int64 NumPy (n+1,), its bytes as uint8 NumPy)."""
    import pyarrow as pa

    n = len(arr)
    otype = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    bufs = arr.buffers()
    off = np.frombuffer(bufs[1], dtype=otype)[arr.offset:arr.offset + n + 1] \
        if bufs[1] is not None else np.zeros(n + 1, dtype=otype)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None \
        else np.zeros(0, dtype=np.uint8)
    return off.astype(np.int64), data


def _empty():
    return Parsed(np.zeros(0), np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int32),
                  np.zeros(0), -1, 0, np.zeros(0, dtype=np.int64))


def _parse(arr):
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(arr)
    if n == 0:
        return _empty()
    if arr.null_count:
        bad = np.flatnonzero(~arr.is_valid().to_numpy(zero_copy_only=False))[0]
        raise LibsvmError(bad, "line is null")
    off, data = _buffers(arr)
    if np.any(data[off[0]:off[-1]] == _HASH):
        arr = pc.replace_substring_regex(arr, "(?s)#.*", "")
    text = pc.ascii_trim_whitespace(arr)
    ok = pc.match_substring_regex(text, _LINE)
    if not pc.all(ok).as_py():
        bad = int(np.flatnonzero(~ok.to_numpy(zero_copy_only=False))[0])
        raise LibsvmError(bad, _explain(text[bad].as_py()))

    off, data = _buffers(text)
    buf = data[off[0]:off[-1]]
    off = off - off[0]
    kept = np.flatnonzero(off[1:] > off[:-1])  # non-empty lines: the rows
    rows = kept.shape[0]
    if rows == 0:
        return _empty()

    # Separators (the line shape is checked: a colon sits between digits and a
    # token, runs of spaces/tabs between tokens; lines hold no separator at either end).
    is_sep = buf == _SPACE
    is_sep |= buf == _COLON
    is_sep |= buf == _TAB
    sep = np.flatnonzero(is_sep)
    del is_sep
    glued = buf.copy()
    glued[sep] = _ZERO
    # Spaces/tabs and colons alternate, unless a run of spaces/tabs has several bytes.
    if sep.shape[0] % 2 or not np.all(buf[sep[1::2]] == _COLON):
        sep = np.delete(sep, np.flatnonzero(sep[1:] == sep[:-1] + 1) + 1)
    # Now a space/tab run starts each feature and a colon follows its index.
    colons = sep[1::2]
    glued[colons] = _DOT
    per_line = np.diff(np.searchsorted(sep[0::2], off))
    indptr = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(per_line[kept], out=indptr[1:])
    nnz = int(indptr[-1])

    # Strings label, index, value, index, value, ... of all rows, back to back.
    count = rows + 2 * nnz
    label_at = np.arange(rows, dtype=np.int64) + 2 * indptr[:-1]
    is_pair = np.ones(count, dtype=bool)
    is_pair[label_at] = False
    starts = np.empty(count + 1, dtype=np.int64)
    starts[label_at] = off[kept]
    sep[1::2] += 1  # a value starts after its colon
    starts[:-1][is_pair] = sep
    starts[-1] = off[kept[-1] + 1]
    strings = pa.LargeStringArray.from_buffers(count, pa.py_buffer(starts),
                                               pa.py_buffer(glued))
    try:
        numbers = pc.cast(strings, pa.float64()).to_numpy()
    except pa.ArrowInvalid:
        j = _first_uncastable(strings)
        row = int(np.searchsorted(label_at, j, side="right")) - 1
        tok = (j - int(label_at[row]) + 1) // 2  # token number in the line
        raise LibsvmError(kept[row], _bad_number(text, kept[row], tok)) from None

    labels = numbers[label_at]
    pairs = numbers[is_pair].reshape(nnz, 2)
    index1 = pairs[:, 0]  # 1-based, exact (digits only, below 2**53 once checked)
    values = np.ascontiguousarray(pairs[:, 1])

    def fail(k, why):  # k: position among the non-zeros; why(its token, the one before)
        row = int(np.searchsorted(indptr, k, side="right")) - 1
        tokens = _tokens(text, kept[row])
        at = 1 + int(k) - int(indptr[row])
        raise LibsvmError(kept[row], why(_q(tokens[at]), _q(tokens[at - 1])))

    bad = np.flatnonzero(~np.isfinite(labels))
    if bad.shape[0]:
        line = kept[bad[0]]
        raise LibsvmError(line, f"label {_q(_tokens(text, line)[0])} is not a finite number")
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.shape[0]:
        fail(bad[0], lambda t, _b: f"value in {t} is not a finite number")
    lo, hi = (float(index1.min()), float(index1.max())) if nnz else (1.0, 0.0)
    if lo < 1:
        fail(np.flatnonzero(index1 < 1)[0],
             lambda t, _b: f"index 0 in {t}: LIBSVM indices start at 1")
    if hi >= _MAX_INDEX:
        fail(np.flatnonzero(index1 >= _MAX_INDEX)[0],
             lambda t, _b: f"index in {t} is too large (limit {_MAX_INDEX - 1})")
    if nnz > 1:
        bad = index1[1:] <= index1[:-1]
        first = indptr[1:-1]
        bad[first[(first > 0) & (first < nnz)] - 1] = False  # a row's first index
        bad = np.flatnonzero(bad)
        if bad.shape[0]:
            k = int(bad[0]) + 1  # not above the index before it, in the same row
            fail(k, lambda t, before: f"indices not strictly ascending: {t} after {before}")

    max_index = int(hi) - 1 if nnz else -1
    index_dtype = np.int32 if max_index < 2**31 - 1 else np.int64
    indices = index1.astype(index_dtype)
    indices -= 1
    return Parsed(labels, indptr, indices, values, max_index, rows, kept.astype(np.int64))


def _first_uncastable(strings):
    """Position of the first string the float64 cast refuses (bisection: about one
    more cast of the whole array, in log2(n) pieces)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    lo, hi = 0, len(strings)  # strings[:lo] cast; strings[lo:hi] holds a failure
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            pc.cast(strings.slice(lo, mid - lo), pa.float64())
        except pa.ArrowInvalid:
            hi = mid
        else:
            lo = mid
    return lo


def _concat(parts, lengths):
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return _empty()
    bases = np.cumsum([0] + lengths[:-1])
    indptr = [np.zeros(1, dtype=np.int64)]
    nnz = 0
    for p in parts:
        indptr.append(p.indptr[1:] + nnz)
        nnz += int(p.indptr[-1])
    max_index = max(p.max_index for p in parts)
    index_dtype = np.int32 if max_index < 2**31 - 1 else np.int64
    return Parsed(
        np.concatenate([p.labels for p in parts]),
        np.concatenate(indptr),
        np.concatenate([p.indices for p in parts]).astype(index_dtype, copy=False),
        np.concatenate([p.values for p in parts]),
        max_index,
        sum(p.rows for p in parts),
        np.concatenate([p.line_of_row + b for p, b in zip(parts, bases)]),
    )


# ----------------------------------------------------------------------------
# Messages (one bad line, plain Python).
# ----------------------------------------------------------------------------


def _q(s, limit=60):
    return repr(s if len(s) <= limit else s[:limit - 3] + "...")


def _tokens(text, line):
    """The tokens (label first) of trimmed line ``line`` of ``text``."""
    return re.split(r"[ \t]+", text[int(line)].as_py())


def _bad_number(text, line, k):
    tok = _tokens(text, line)[k]
    if k == 0:
        return f"label {_q(tok)} is not a number"
    return f"value in {_q(tok)} is not a number"


def _explain(line):
    """Why a trimmed line does not match :data:`_LINE`."""
    if any(c in line for c in "\n\v\f\r"):
        return f"control character inside the line {_q(line)}"
    tokens = re.split(r"[ \t]+", line)
    if ":" in tokens[0]:
        return f"line does not start with a label: {_q(line)}"
    for tok in tokens[1:]:
        colons = tok.count(":")
        if colons == 0:
            return f"token {_q(tok)} is not index:value"
        if colons > 1:
            return f"token {_q(tok)} has more than one ':'"
        index, value = tok.split(":")
        if not index:
            return f"missing index in {_q(tok)}"
        if not re.fullmatch("[0-9]+", index):
            return f"index in {_q(tok)} is not a positive integer"
        if not value:
            return f"missing value in {_q(tok)}"
    return f"malformed line {_q(line)}"  # pragma: no cover
