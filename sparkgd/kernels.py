"""Per-partition kernels: pointwise losses and the one linear lift they share.

A loss only knows its raw prediction ``z``: ``loss(y, z)`` and ``d loss / d z``,
row by row. The lift turns that into coefficients:

    z      = X @ coef.T + intercept          (n, K)   K = 1 for every loss but multinomial
    g_coef = X.T @ (w * dz)                  (d, K)
    g_int  = sum_i w_i * dz_i                (K,)

Everything a kernel returns is a *sum* over rows (loss, gradient, weight), never
a mean, so any order of aggregation gives the same total up to rounding; the
driver divides by W = sum_i w_i once.

The parameters travel as one flat float64 vector ``theta`` laid out as
``[coef.ravel() (K*d), intercept (K, only when fitIntercept)]`` -- see
:class:`Layout`. A partial result is one flat vector too:
``[loss_sum, weight_sum, grad (len(theta))]``, so aggregation is plain ``+``.
"""
from __future__ import annotations

import itertools
import os
import threading

import numpy as np
import scipy.sparse as sp

# ----------------------------------------------------------------------------
# Pointwise losses. Each states its formula; ``z`` has shape (n, K).
# ----------------------------------------------------------------------------

LOSSES = {}


def _register(cls):
    LOSSES[cls.name] = cls
    return cls


class Loss:
    """``loss(y, z)`` summed with weights; ``derivative`` is d loss / d z."""

    name = None
    #: "real" labels, "binary" {0, 1}, or "class" {0, ..., K-1}
    labels = "real"
    #: A typical second derivative ``d^2 loss / dz^2``: how much curvature the data gives
    #: a coefficient per unit of its feature's variance. The preconditioner weighs the
    #: penalty's curvature against it (:class:`sparkgd.stats.Preconditioner`).
    curvature = 1.0

    def n_outputs(self, num_classes):
        return 1

    def value_and_derivative(self, y, z):
        """Return (loss per row, shape (n,); d loss/d z, shape of z)."""
        raise NotImplementedError

    def summed(self, y, z, w=None):
        """``(sum_i w_i loss_i, w * dloss/dz)`` for a row chunk: what a pass needs, the
        value already summed (a loss may then skip per-row values it only adds up).
        ``z`` (n, K) float64 is the caller's scratch: a loss may overwrite it."""
        value, dz = self.value_and_derivative(y, z)
        if w is None:
            return float(value.sum()), dz
        return float(value @ w), dz * w[:, None]

    def params(self):
        return {}


@_register
class SquaredLoss(Loss):
    """``0.5 * (y - z)^2``; derivative ``z - y``."""

    name = "squared"

    def value_and_derivative(self, y, z):
        r = z[:, 0] - y
        return 0.5 * r * r, r[:, None]

    def summed(self, y, z, w=None):
        r = z[:, 0]
        r -= y
        if w is None:
            return 0.5 * float(r @ r), z
        wr = r * w
        return 0.5 * float(wr @ r), wr[:, None]


@_register
class LogisticLoss(Loss):
    """``log(1 + e^z) - y z`` for y in {0, 1}; derivative ``sigmoid(z) - y``.

    Computed as ``logaddexp(0, z) - y z`` so large |z| neither overflows nor
    loses the small tail.
    """

    name = "logistic"
    labels = "binary"
    curvature = 0.25   # sigmoid'(z) at its largest, z = 0

    def value_and_derivative(self, y, z):
        z = z[:, 0]
        e = np.abs(z)  # e = exp(-|z|): one exp serves both, no overflow, full precision
        np.negative(e, out=e)
        np.exp(e, out=e)
        value = np.log1p(e)
        value += np.maximum(z, 0.0)
        value -= y * z
        p = np.where(z >= 0, 1.0, e)  # sigmoid(z) = 1/(1+e) or e/(1+e)
        e += 1.0
        p /= e
        p -= y
        return value, p[:, None]

    def summed(self, y, z, w=None):
        """The pass's form, y in {0, 1} (the fit checks the labels): with
        ``e = exp(-|z|)``, ``q = 1 + e``, the loss is ``log q + max(s z, 0)`` where
        ``s = 1 - 2y`` (``max(z, 0) - y z`` for those labels: no cancellation, every
        term >= 0), and the derivative ``sigmoid(z) - y`` is ``(z >= 0 ? 1 : e) / q - y``.
        One exp a row and nothing kept per row but the derivative. Unweighted, the logs
        are summed as the logs of products of :data:`LOG_GROUP` rows (each ``q`` lies in
        [1, 2], so a product stays below 2^512): float64's ``exp`` and ``log`` cost
        ~5 ns a row each on CPUs without AVX-512, the products 0.3."""
        z = z[:, 0]
        e = np.abs(z)
        np.negative(e, out=e)
        np.exp(e, out=e)
        q = e + 1.0
        t = y * -2.0
        t += 1.0
        t *= z                              # s z = (1 - 2y) z
        np.maximum(t, 0.0, out=t)
        p = np.where(z >= 0, 1.0, e)
        p /= q
        p -= y
        if w is None:
            return _sum_log(q) + float(t.sum()), p[:, None]
        value = float(np.log(q, out=q) @ w) + float(t @ w)
        p *= w
        return value, p[:, None]


LOG_GROUP = 512


def _sum_log(q):
    """``sum(log(q))`` for ``q`` in [1, 2]: the logs of products of LOG_GROUP values
    (rounding grows by ~LOG_GROUP ulps of each group's log: below 1e-13 a group)."""
    k = q.shape[0] - q.shape[0] % LOG_GROUP
    out = float(np.log(np.multiply.reduce(q[:k].reshape(-1, LOG_GROUP), axis=1)).sum())
    return out + float(np.log(q[k:]).sum())


@_register
class HuberLoss(Loss):
    """``0.5 r^2`` if ``|r| <= epsilon`` else ``epsilon (|r| - epsilon/2)``, ``r = y - z``.

    Derivative in z: ``-r`` inside the band, ``-epsilon sign(r)`` outside.
    """

    name = "huber"

    def __init__(self, epsilon=1.35):
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0 (got {epsilon})")
        self.epsilon = float(epsilon)

    def params(self):
        return {"epsilon": self.epsilon}

    def value_and_derivative(self, y, z):
        eps = self.epsilon
        r = y - z[:, 0]
        a = np.abs(r)
        inside = a <= eps
        value = np.where(inside, 0.5 * r * r, eps * (a - 0.5 * eps))
        deriv = np.where(inside, -r, -eps * np.sign(r))
        return value, deriv[:, None]


@_register
class HingeLoss(Loss):
    """``max(0, 1 - s z)`` with ``s = 2y - 1`` for y in {0, 1}.

    Not differentiable at ``s z = 1``; the subgradient used there is 0 (as
    Spark ML's LinearSVC).
    """

    name = "hinge"
    labels = "binary"

    def value_and_derivative(self, y, z):
        s = 2.0 * y - 1.0
        m = 1.0 - s * z[:, 0]
        active = m > 0
        return np.where(active, m, 0.0), np.where(active, -s, 0.0)[:, None]


@_register
class MultinomialLoss(Loss):
    """``logsumexp(z) - z_y`` for y in {0, ..., K-1}, z in R^K.

    Derivative in z: ``softmax(z) - onehot(y)``. Computed with the row maximum
    subtracted, so no exp overflows.
    """

    name = "multinomial"
    labels = "class"
    curvature = 0.25   # p (1 - p) at its largest

    def n_outputs(self, num_classes):
        return int(num_classes)

    def value_and_derivative(self, y, z):
        n, k = z.shape
        zmax = z.max(axis=1, keepdims=True)
        e = np.exp(z - zmax)
        total = e.sum(axis=1, keepdims=True)
        lse = (np.log(total) + zmax)[:, 0]
        idx = y.astype(np.int64)
        rows = np.arange(n)
        value = lse - z[rows, idx]
        dz = e / total
        dz[rows, idx] -= 1.0
        return value, dz

    def summed(self, y, z, w=None):
        """The pass's form, in place in ``z`` and class by class: the margins come from
        :func:`chunk_margins` class-major (``z.T`` contiguous), so the row maximum, the
        exps and their sums run along rows of n values, not across K-wide rows; the
        derivative is returned in ``z``'s memory."""
        zt = z.T
        n = zt.shape[1]
        zmax = zt.max(axis=0)
        zt -= zmax
        idx = y.astype(np.int64)
        cols = np.arange(n)
        value = -zt[idx, cols]              # -(z_y - max)
        np.exp(zt, out=zt)
        total = zt.sum(axis=0)
        value += np.log(total)              # logsumexp(z) - z_y
        zt /= total
        zt[idx, cols] -= 1.0
        if w is None:
            return float(value.sum()), z
        zt *= w
        return float(value @ w), z


def _sigmoid(z):
    # exp of a non-positive number only: no overflow, full precision in both tails.
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def make_loss(name, **params):
    try:
        cls = LOSSES[name]
    except KeyError:
        raise ValueError(
            f"unknown loss {name!r}; expected one of {', '.join(sorted(LOSSES))}"
        ) from None
    return cls(**params)


# ----------------------------------------------------------------------------
# The parameter layout and the linear lift.
# ----------------------------------------------------------------------------


class Layout:
    """Where coefficients and intercepts sit in the flat vector ``theta``."""

    def __init__(self, num_features, num_outputs=1, fit_intercept=True):
        self.d = int(num_features)
        self.k = int(num_outputs)
        self.fit_intercept = bool(fit_intercept)
        self.n_coef = self.d * self.k
        self.size = self.n_coef + (self.k if self.fit_intercept else 0)

    def split(self, theta):
        """-> (coef (K, d) view, intercept (K,) array)."""
        coef = theta[: self.n_coef].reshape(self.k, self.d)
        if self.fit_intercept:
            intercept = theta[self.n_coef :]
        else:
            intercept = np.zeros(self.k)
        return coef, intercept

    def join(self, coef, intercept):
        coef = np.asarray(coef, dtype=np.float64).reshape(self.k, self.d)
        parts = [coef.ravel()]
        if self.fit_intercept:
            parts.append(np.asarray(intercept, dtype=np.float64).reshape(self.k))
        return np.concatenate(parts)

    def zeros(self):
        return np.zeros(self.size)


def widen(X, d):
    """CSR ``X`` as ``d`` columns wide (no copy): the columns added are all zero."""
    if X.shape[1] == d:
        return X
    return sp.csr_matrix((X.data, X.indices, X.indptr), shape=(X.shape[0], d), copy=False)


def margins(X, coef, intercept):
    """z = X @ coef.T + intercept, shape (n, K); X dense or CSR."""
    z = X @ coef.T
    if sp.issparse(z):  # pragma: no cover - scipy returns dense for sparse @ dense
        z = z.toarray()
    z = np.asarray(z)
    z += intercept
    return z


def cache_chunk_bytes(root="/sys/devices/system/cpu/cpu0/cache", default=2 << 20):
    """Bytes of a row chunk for this machine: an eighth of the last-level cache's share
    a core (its size over the CPUs that share it), within [1, 8] MiB; ``default`` where
    the kernel does not say. The chunk must still be in cache when the gradient reads it
    again after the loss, beside the other task's chunk and the loss's temporaries;
    measured on a 2-core EPYC (32 MiB L3 shared by both): 500,000 x 100 float64, 1 / 2 /
    4 / 8 / 16 MiB chunks -> 71 / 68 / 75 / 78 / 80 ms a pass."""
    best = None
    try:
        for entry in sorted(os.listdir(root)):
            path = os.path.join(root, entry)
            if not entry.startswith("index"):
                continue
            with open(os.path.join(path, "level")) as f:
                level = int(f.read())
            with open(os.path.join(path, "size")) as f:
                size = _cache_size(f.read().strip())
            with open(os.path.join(path, "shared_cpu_list")) as f:
                cpus = _cpu_count(f.read().strip())
            if best is None or level > best[0]:
                best = (level, size // max(cpus, 1))
    except (OSError, ValueError):
        return default
    if best is None or best[1] <= 0:
        return default
    return int(min(max(best[1] // 8, 1 << 20), 8 << 20))


def _cache_size(text):
    """'32768K' -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text and text[-1].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def _cpu_count(text):
    """'0-1,4' -> 3."""
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


#: Bytes of a dense block handled at once (as stored: float32 chunks have twice the
#: rows), so the second product (``wdz.T @ X_c``) reads rows the first one
#: (``X_c @ coef.T``) just brought into cache -- one trip through memory a pass.
CHUNK_BYTES = cache_chunk_bytes()


def chunk_rows(d, itemsize):
    """Rows in one of :func:`row_chunks`' dense chunks."""
    return max(256, CHUNK_BYTES // (itemsize * max(d, 1)))


def row_chunks(X, y, w, block_rows=None):
    """Split a block into the pieces the kernel handles at once: dense blocks into
    row chunks of about :data:`CHUNK_BYTES` (views, no copy), CSR blocks whole.
    ``block_rows``: the rows of the whole block this is a window of (a streamed block's
    windows start at whole chunks: cut as the block is, they give the block's chunks)."""
    n = y.shape[0]
    whole = n if block_rows is None else int(block_rows)
    if sp.issparse(X) or whole * X.shape[1] * X.itemsize <= 2 * CHUNK_BYTES:
        return [(X, y, w)]
    step = chunk_rows(X.shape[1], X.itemsize)
    return [(X[s:s + step], y[s:s + step], None if w is None else w[s:s + step])
            for s in range(0, n, step)]


def block_sums(X, y, w, theta, loss, layout):
    """One block's partial result ``[loss_sum, weight_sum, grad...]``.

    ``w`` may be None (all weights 1). Dense blocks are processed in row chunks
    of about :data:`CHUNK_BYTES` (the fused pass); the sums are the same.
    """
    out = np.zeros(2 + layout.size)
    for Xc, yc, wc in row_chunks(X, y, w):
        out += _block_sums(Xc, yc, wc, theta, loss, layout)
    return out


_WIDE = threading.local()


def _widened(X):
    """``X`` (a float32 row chunk) as float64, in this thread's reused buffer: a fresh
    4 MB array per chunk costs page faults and zeroing that outweigh the products."""
    buf = getattr(_WIDE, "buf", None)
    if buf is None or buf.size < X.size:
        buf = _WIDE.buf = np.empty(X.size)
    out = buf[:X.size].reshape(X.shape)
    np.copyto(out, X)
    return out


def as_float64(X, d):
    """A row chunk as the kernels compute with it: dense float32 storage widened to
    float64 (in this thread's reused buffer: valid until the next call), CSR as ``d``
    columns wide (LIBSVM blocks are as wide as their largest index); float64 as is."""
    if sp.issparse(X):
        return widen(X, d)
    if X.dtype != np.float64:
        return _widened(X)
    return X


def _block_sums(X, y, w, theta, loss, layout):
    """One row chunk's ``[loss_sum, weight_sum, grad...]``: the margins (the chunk read
    from memory), the loss and its derivative a row, the gradient (the chunk read again
    while it is in cache). A float32 chunk is multiplied as float32 (half the bytes), the
    loss and every sum in float64."""
    out = np.zeros(2 + layout.size)
    if y.shape[0] == 0:
        return out
    coef, intercept = layout.split(theta)
    z = chunk_margins(X, coef, intercept, layout.d)
    out[0], wdz = loss.summed(y, z, w)
    out[1] = y.shape[0] if w is None else w.sum()
    grad = out[2:]
    grad[: layout.n_coef] = chunk_gradient(X, wdz, layout.d).ravel()
    if layout.fit_intercept:
        grad[layout.n_coef :] = wdz.sum(axis=0)
    return out


def models_sums(blocks, theta, loss, layout, threads=1):
    """``layout.k`` models of one single-output loss at once (``fitMultiple``: several
    param maps over the same blocks): ``theta`` stacks their coefficients as the rows of
    ``coef`` (K, d) and their intercepts, as a K-output layout lays them out. Each row
    chunk is read once for all of them: ``Z = X @ coef.T + b`` (n, K), each model's loss
    on its column, then ``wdz.T @ X`` (K, d).

    -> ``[0, weight_sum, loss_sum of each model (K), grad (layout.size)]``: model k's
    own pass is ``[loss_sums[k], weight_sum, coef_grad[k], intercept_grad[k]]``
    (:func:`split_models`)."""
    k = layout.k
    out = np.zeros(2 + k + layout.size)
    coef, intercept = layout.split(theta)
    grad = out[2 + k:]
    with blas_threads(threads):
        for X, y, w in blocks:
            for Xc, yc, wc in row_chunks(X, y, w):
                n = yc.shape[0]
                if n == 0:
                    continue
                z = chunk_margins(Xc, coef, intercept, layout.d)   # columns contiguous
                wdz = np.empty((n, k), order="F")
                for j in range(k):
                    value, dz = loss.summed(yc, z[:, j:j + 1], wc)
                    out[2 + j] += value
                    wdz[:, j] = dz[:, 0]
                out[1] += n if wc is None else wc.sum()
                grad[:layout.n_coef] += chunk_gradient(Xc, wdz, layout.d).ravel()
                if layout.fit_intercept:
                    grad[layout.n_coef:] += wdz.sum(axis=0)
    return out


def split_models(total, d, k, fit_intercept):
    """:func:`models_sums`' vector -> each model's ``[loss_sum, weight_sum, grad...]``."""
    n_coef = d * k
    coefs = total[2 + k:2 + k + n_coef].reshape(k, d)
    out = []
    for j in range(k):
        parts = [total[2 + j:3 + j], total[1:2], coefs[j]]
        if fit_intercept:
            parts.append(total[2 + k + n_coef + j:3 + k + n_coef + j])
        out.append(np.concatenate(parts))
    return out


def chunk_margins(X, coef, intercept, d):
    """``z = X @ coef.T + intercept``, (n, K) float64 and the caller's own, for a row
    chunk as it is stored: dense float64 or float32 (multiplied in float32: BLAS reads
    half the bytes) or CSR (of width up to ``d``). One output column is a matrix-vector
    product."""
    if sp.issparse(X):
        X = widen(X, d)
    elif X.dtype != coef.dtype:
        coef = coef.astype(X.dtype)
    if coef.shape[0] == 1:
        z = X @ coef[0]
        z = z[:, None]
    else:
        z = (coef @ X.T).T                  # class-major: each class's margins contiguous
    z = np.asarray(z, dtype=np.float64)
    z += intercept
    return z


def chunk_gradient(X, wdz, d):
    """``wdz.T @ X``, (K, d) float64: the row chunk's coefficient sums (a float32 chunk
    multiplies a float32 copy of ``wdz``)."""
    if sp.issparse(X):
        X = widen(X, d)
        g = X.T @ wdz[:, 0] if wdz.shape[1] == 1 else (X.T @ wdz).T
    else:
        if X.dtype != wdz.dtype:
            wdz = wdz.astype(X.dtype)
        g = wdz[:, 0] @ X if wdz.shape[1] == 1 else wdz.T @ X
    return np.asarray(g, dtype=np.float64).reshape(wdz.shape[1], -1)


def chunk_derivative(X, y, w, theta, loss, layout):
    """A non-empty row chunk's ``(X, out, wdz)``: ``X`` in float64 and ``layout.d``
    wide, ``out = [loss_sum, weight_sum, 0...]`` and ``wdz`` the weighted derivative of
    the loss in the margins, ``w * dloss/dz`` (n, K)."""
    out = np.zeros(2 + layout.size)
    X = as_float64(X, layout.d)
    coef, intercept = layout.split(theta)
    value, dz = loss.value_and_derivative(y, margins(X, coef, intercept))
    if w is None:
        out[0] = value.sum()
        out[1] = y.shape[0]
        return X, out, dz
    out[0] = value @ w
    out[1] = w.sum()
    return X, out, dz * w[:, None]


def add_gradient(out, X, wdz, layout):
    """``out[2:]`` = the chunk's gradient sum ``X.T @ wdz`` (coefficients, (K, d) row by
    row) and ``wdz``'s column sums (intercepts); returns ``out``."""
    grad = out[2:]
    grad[: layout.n_coef] = np.asarray(X.T @ wdz).T.ravel()
    if layout.fit_intercept:
        grad[layout.n_coef :] = wdz.sum(axis=0)
    return out


def partition_loss(blocks, theta, loss, layout):
    """``[loss_sum, weight_sum]`` over every row of ``blocks``: the value alone, without
    the gradient's second product (what a local round needs at its start)."""
    out = np.zeros(2)
    coef, intercept = layout.split(theta)
    for X, y, w in blocks:
        for Xc, yc, wc in row_chunks(X, y, w):
            if yc.shape[0] == 0:
                continue
            value, _ = loss.value_and_derivative(yc, chunk_margins(Xc, coef, intercept,
                                                                   layout.d))
            out[0] += value.sum() if wc is None else value @ wc
            out[1] += yc.shape[0] if wc is None else wc.sum()
    return out


def sample_rows(n, fraction, seed, iteration, partition, block):
    """Boolean mask of a fresh mini-batch: a pure function of its arguments, so a
    given (seed, partitioning) always draws the same rows at the same iteration."""
    rng = np.random.default_rng([int(seed) % (1 << 64), int(iteration), int(partition),
                                 int(block)])
    return rng.random(n) < fraction


_BLAS_NAMES = ("openblas_set_num_threads", "scipy_openblas_set_num_threads64_",
               "scipy_openblas_set_num_threads", "openblas_set_num_threads64_")
_blas = None


def _openblas_setters():
    """(set, get) pairs of every OpenBLAS loaded in this process (NumPy's wheels
    bundle one); empty when NumPy uses another BLAS, which then keeps its own setting."""
    global _blas
    if _blas is None:
        import ctypes

        found, paths = [], set()
        try:
            with open("/proc/self/maps") as f:
                paths = {ln.split()[-1] for ln in f
                         if "openblas" in ln.rsplit("/", 1)[-1].lower()}
        except OSError:
            pass
        for path in sorted(paths):
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for name in _BLAS_NAMES:
                setter = getattr(lib, name, None)
                getter = getattr(lib, name.replace("_set_", "_get_"), None)
                if setter is not None and getter is not None:
                    found.append((setter, getter))
                    break
        _blas = found
    return _blas


def read_sums(blocks, threads=1):
    """``[sum of every stored value, rows]`` of the blocks: one read of the bytes a pass
    reads (dense values as stored; a CSR block's values and column indices), chunk by
    chunk in ``threads`` threads (NumPy's sums let go of the GIL) -- the floor of a pass
    on this machine, measured where the pass runs."""
    rows = [0]

    def pieces():
        for X, y, w in blocks:
            rows[0] += y.shape[0]
            for c in row_chunks(X, y, w):
                yield c[0]

    def one(X):
        if sp.issparse(X):
            return float(X.data.sum()) + float(X.indices.sum())
        return float(X.sum())

    parts = list(_in_order(one, pieces(), threads))
    return np.array([float(np.sum(parts)), float(rows[0])])


def _in_order(fn, items, threads=1):
    """``fn`` of each of ``items``, in order, with ``threads`` of them computed at once at
    most (and as many fetched ahead): blocks read as windows (the file store's streamed
    passes) are then held a few at a time, never all."""
    if threads <= 1:
        for item in items:
            yield fn(item)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(int(threads)) as pool:
        running = deque()
        for item in items:
            running.append(pool.submit(fn, item))
            if len(running) >= threads:
                yield running.popleft().result()
        while running:
            yield running.popleft().result()


class blas_threads:
    """``with blas_threads(n):`` BLAS calls in this block use n threads.

    PySpark starts Python workers with ``OMP_NUM_THREADS`` = ``spark.task.cpus``
    (1), so BLAS in a task is single-threaded; a sparkgd task that owns all of an
    executor's cores gives them to BLAS for its dense products, then restores."""

    def __init__(self, n):
        self.n = max(1, int(n))
        self._old = []

    def __enter__(self):
        for setter, getter in _openblas_setters():
            old = getter()
            if old != self.n:
                setter(self.n)
                self._old.append((setter, old))
        return self

    def __exit__(self, *exc):
        for setter, old in self._old:
            setter(old)
        self._old = []


def _chunk_rng(seed, iteration, partition):
    return np.random.default_rng([int(seed) % (1 << 64), int(iteration), int(partition),
                                  0x6368756E6B])    # "chunk"


def keep_chunks(n, keep, seed, iteration, partition):
    """Which of ``n`` row chunks a lighter pass computes: each with probability
    ``keep``, a pure function of its arguments (drawn apart from :func:`sample_rows`;
    the i-th chunk's draw is the same whatever ``n``)."""
    return _chunk_rng(seed, iteration, partition).random(n) < keep


def partition_sums(blocks, theta, loss, layout, sample=None, threads=1, chunks=None,
                   piece_sums=None):
    """Sum of :func:`block_sums` over an iterable of (X, y, w) blocks.

    ``sample = (fraction, seed, iteration, partition_index)`` restricts each
    block to a fresh Bernoulli(fraction) sample of its rows. ``threads > 1``
    spreads CSR pieces over a thread pool (SciPy's sparse products are
    single-threaded); dense chunks stay in this thread and BLAS gets ``threads``
    threads (:class:`blas_threads`) -- Python threads around BLAS contend for
    the GIL between products (1M x 100 on two cores: 0.039 s this way, 0.044-0.055 s
    with two Python threads).
    The partial sums are added in chunk order either way, so the result does not
    depend on the number of threads. Streamed blocks (:class:`sparkgd.engine.files.
    Streamed`: windows of block files) give a dense block's own chunks, so the same rows
    and, one thread, the same sums; with ``threads > 1`` their windows are summed in
    threads and added in order (the sums round differently, ~1e-16), and a CSR block's
    windows are its chunks (``chunks`` then draws per window).

    ``chunks = (keep, seed, iteration, partition_index)``: only the row chunks
    :func:`keep_chunks` draws are computed -- a lighter pass that copies nothing (views
    of dense chunks; a CSR block is one chunk), which a slow task is given in
    ``mode=async`` (the sums say how much weight it drew).

    ``piece_sums(X, y, w, theta, loss, layout)``: the sums of one row chunk instead of
    :func:`block_sums`' (DP-SGD: :func:`sparkgd.privacy.clipped_sums` with its clip bound,
    on a Poisson ``sample``).
    """
    def groups():
        """Each block's (or streamed window's) row chunks that this pass computes."""
        drawn = (None, None)                   # (block, its sample): windows share it
        draws = None
        if chunks is not None and chunks[0] < 1.0:
            draws = _chunk_rng(*chunks[1:])    # keep_chunks' draws, one a chunk, in order
        for j, item in enumerate(blocks):
            X, y, w = item
            if sample is not None:
                fraction, seed, iteration, partition = sample
                # a window of a streamed block (engine/files.py) takes its rows' part of
                # the block's own sample: the rows a pass over the whole block draws
                block = getattr(item, "block", j)
                rows = getattr(item, "block_rows", y.shape[0])
                if drawn[0] != block:
                    drawn = (block, sample_rows(rows, fraction, seed, iteration, partition,
                                                block))
                start = getattr(item, "start", 0)
                mask = drawn[1][start:start + y.shape[0]]
                X, y, w = X[mask], y[mask], None if w is None else w[mask]
            # (a window of a block as the block is cut, unless rows were drawn from it)
            pieces = row_chunks(X, y, w, None if sample is not None else
                                getattr(item, "block_rows", None))
            if draws is not None:
                pieces = [piece for piece in pieces if draws.random() < chunks[0]]
            if pieces:
                yield pieces

    kernel = _block_sums if piece_sums is None else piece_sums

    def one(piece):
        return kernel(piece[0], piece[1], piece[2], theta, loss, layout)

    def group_sum(pieces):
        part = np.zeros(2 + layout.size)
        for piece in pieces:
            part += one(piece)
        return part

    total = np.zeros(2 + layout.size)
    todo = groups()
    first = next(todo, None)
    if first is None:
        return total
    todo = itertools.chain([first], todo)
    if threads > 1 and getattr(blocks, "streamed", False):
        # windows mapped afresh each pass: their pages fault in as they are read, so the
        # windows go to ``threads`` threads (BLAS on one each) rather than one window to
        # threaded BLAS; their sums are added in window order
        with blas_threads(1):
            for part in _in_order(group_sum, todo, threads):
                total += part
        return total
    todo = (piece for pieces in todo for piece in pieces)
    if threads > 1 and sp.issparse(first[0][0]):
        for part in _in_order(one, todo, threads):
            total += part
        return total
    with blas_threads(threads):
        for piece in todo:
            total += one(piece)
    return total
