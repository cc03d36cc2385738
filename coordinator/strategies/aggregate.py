"""Aggregation math as pure numpy functions (no I/O, no MQTT), each tested against a direct version.

Tensors are dicts name -> array. Pairwise work (ce-lora) runs in row blocks so that nothing of size
N x N (let alone N x N x params) is ever materialized: at 10,000 agents an N x N float32 matrix alone
is 400 MB.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

Tensors = Mapping[str, np.ndarray]

# Row-block budget for the pairwise kernels: block_rows * N * labels floats (float64) at most.
DEFAULT_BLOCK_ELEMENTS = 4_000_000


# ---- sample-weighted mean (fedavg) -------------------------------------------------------------
def sample_weights(num_samples: Sequence[float]) -> np.ndarray:
    """Weights proportional to sample counts; all-zero counts fall back to equal weights."""
    w = np.asarray(num_samples, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0:
        raise ValueError("need at least one sample count")
    if np.any(w < 0) or not np.all(np.isfinite(w)):
        raise ValueError("sample counts must be finite and >= 0")
    total = w.sum()
    return np.full(len(w), 1.0 / len(w)) if total <= 0 else w / total


class WeightedMean:
    """Streaming weighted mean of tensor dicts: holds one running sum, never all updates."""

    def __init__(self) -> None:
        self._sum: dict[str, np.ndarray] = {}
        self._weight = 0.0
        self._count = 0

    def add(self, tensors: Tensors, weight: float) -> None:
        if self._count and set(tensors) != set(self._sum):
            raise ValueError("all updates must carry the same tensor names")
        for name, arr in tensors.items():
            a = np.asarray(arr)
            acc = self._sum.get(name)
            if acc is None:
                acc = self._sum[name] = np.zeros(a.shape, dtype=np.float64)
            # The product in the input's own float type, the sum in float64: one small temporary
            # per tensor instead of a float64 copy and a float64 product (this loop is memory-bound).
            acc += a * (a.dtype.type(weight) if a.dtype.kind == "f" else weight)
        self._weight += float(weight)
        self._count += 1

    def result(self, dtype: np.dtype | type = np.float32) -> dict[str, np.ndarray]:
        if not self._count:
            raise ValueError("no updates to average")
        if self._weight <= 0:
            raise ValueError("total weight is zero; use sample_weights() to fall back to equal weights")
        return {k: (v / self._weight).astype(dtype) for k, v in sorted(self._sum.items())}


def weighted_average(updates: Sequence[Tensors], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """sum_k w_k x_k / sum_k w_k per tensor: the same as np.average(stack, axis=0, weights=w)."""
    w = sample_weights(weights)
    acc = WeightedMean()
    for tensors, wk in zip(updates, w, strict=True):
        acc.add(tensors, wk)
    dtype = next(iter(updates[0].values())).dtype if updates and updates[0] else np.float32
    return acc.result(dtype)


# ---- coordinate-wise trimmed mean (robust fedavg) ---------------------------------------------
def trimmed_mean_array(stack: np.ndarray, trim_fraction: float) -> np.ndarray:
    """Coordinate-wise mean after dropping the k lowest and k highest values, k = floor(trim * n).

    Sorts along a contiguous agents axis (coordinates x agents): several times faster than sorting
    or partitioning along axis 0, where every coordinate's values are strided.
    """
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    n = stack.shape[0]
    k = int(np.floor(trim_fraction * n))
    if k == 0:
        return stack.mean(axis=0, dtype=np.float64)
    cols = np.ascontiguousarray(np.asarray(stack).reshape(n, -1).T)
    cols.sort(axis=1)
    return cols[:, k : n - k].mean(axis=1, dtype=np.float64).reshape(stack.shape[1:])


def trimmed_mean(updates: Sequence[Tensors], trim_fraction: float) -> dict[str, np.ndarray]:
    names = sorted(updates[0])
    out = {}
    for name in names:  # one tensor at a time: peak memory is N x (one tensor), not N x (all)
        stack = np.stack([np.asarray(u[name]) for u in updates])
        out[name] = trimmed_mean_array(stack, trim_fraction).astype(stack.dtype)
    return out


# ---- update norms -----------------------------------------------------------------------------
def delta_norm(tensors: Tensors, base: Tensors) -> float:
    """L2 norm of (tensors - base) over all tensors together."""
    total = 0.0
    for name, arr in tensors.items():
        # one ufunc in float64 and one dot per tensor: this runs for every update taken in
        d = np.subtract(arr, base[name], dtype=np.float64)
        total += float(np.vdot(d, d))
    return float(np.sqrt(total))


def clip_delta(tensors: Tensors, base: Tensors, max_norm: float) -> dict[str, np.ndarray]:
    """Scale the update (tensors - base) down to `max_norm` if it is longer."""
    norm = delta_norm(tensors, base)
    if norm <= max_norm or norm == 0:
        return {k: np.asarray(v) for k, v in tensors.items()}
    s = max_norm / norm
    return {
        k: (base[k] + s * (np.asarray(v) - base[k])).astype(np.asarray(v).dtype) for k, v in tensors.items()
    }


# ---- ce-lora: personalized aggregation -------------------------------------------------------
def flatten(tensors: Tensors, names: Sequence[str]) -> np.ndarray:
    return np.concatenate([np.asarray(tensors[n], dtype=np.float64).ravel() for n in names])


def unflatten(vector: np.ndarray, like: Tensors, names: Sequence[str]) -> dict[str, np.ndarray]:
    out, pos = {}, 0
    for n in names:
        ref = np.asarray(like[n])
        # A view of `vector` when the dtypes agree: N personalized adapters are one buffer, not two.
        out[n] = vector[pos : pos + ref.size].reshape(ref.shape).astype(ref.dtype, copy=False)
        pos += ref.size
    return out


def embedding_scale(hist: np.ndarray, var_means: np.ndarray) -> float:
    """Fleet-wide within-class spread: 2 x the count-weighted mean per-dimension variance.

    `var_means` [N, L] is each agent's per-label variance averaged over dimensions. The expected
    squared distance between two samples of one class is 2 * var per dimension; the per-dimension
    2-Wasserstein distance of two agents' label Gaussians is measured against it, so the data
    distance does not depend on the embedding's units or dimension.
    """
    h = np.asarray(hist, dtype=np.float64)  # [N, L]
    total = h.sum()
    s = 2.0 * float((h * var_means).sum() / total) if total > 0 else 0.0
    return s if s > 1e-12 else 1.0


class PairwiseInputs:
    """Per-agent quantities the ce-lora distances need, precomputed once (O(N) memory).

    `mean` and `var` may be [N, L, D] arrays or sequences of N [L, D] arrays: they are copied row by
    row into one buffer, so no stacked float64 copy of all statistics ever exists; `deltas` likewise
    (a lazy sequence of rows is fine).
    `compact=True` holds the statistics and unit updates as float16 (half the memory; the wire sends
    means and variances as float16 anyway): the k-nearest path uses it at fleet scale.
    """

    def __init__(
        self,
        hist: np.ndarray,  # [N, L] label counts
        mean: Sequence[np.ndarray] | np.ndarray,  # N x [L, D]
        var: Sequence[np.ndarray] | np.ndarray,  # N x [L, D]
        deltas: Sequence[np.ndarray] | np.ndarray,  # N x [P] C updates (trained - start)
        scale: float | None = None,
        compact: bool = False,
    ):
        hist = np.asarray(hist, dtype=np.float64)
        n, labels = hist.shape
        dim = np.shape(mean[0])[1]
        totals = hist.sum(axis=1, keepdims=True)
        p = np.divide(hist, totals, out=np.zeros_like(hist), where=totals > 0)
        self.n, self.labels, self.dim = n, labels, dim
        self.sqrt_p = np.sqrt(p)  # [N, L]
        store = np.float16 if compact else np.float32
        # Each label's [mean, sqrt(var)] as one vector: W2^2 = ||mu_i - mu_j||^2 + ||s_i - s_j||^2.
        # Label-major [L, N, 2D], so each label's matrix is contiguous for the matmuls below.
        # float32: the matmuls dominate at 10,000 agents; the rounding (~1e-7 relative) is far below
        # anything that changes a softmax weight, and memory halves (N L 2D floats).
        self.g = np.empty((labels, n, 2 * dim), dtype=store)
        self.g_sq = np.empty((n, labels))
        var_means = np.empty((n, labels))
        row = np.empty((labels, 2 * dim), np.float32)
        for i in range(n):
            v = np.asarray(var[i])
            row[:, :dim] = mean[i]
            np.sqrt(v, out=row[:, dim:], casting="same_kind")
            self.g[:, i, :] = row
            r = self.g[:, i, :].astype(np.float64)  # the norms of what is held, rounding included
            self.g_sq[i] = np.einsum("lk,lk->l", r, r)
            var_means[i] = v.mean(axis=1, dtype=np.float64)
        self.scale = embedding_scale(hist, var_means) if scale is None else scale
        # Row by row: no float64 copy of all updates; zero updates stay zero rows (cosine 0).
        self.unit = np.zeros((n, len(deltas[0])), dtype=store)
        for i in range(n):
            d = np.asarray(deltas[i], dtype=np.float64)
            norm = np.linalg.norm(d)
            if norm > 0:
                self.unit[i] = d / norm

    def label_block(self, lab: int, idx: slice | np.ndarray) -> np.ndarray:
        """Label `lab`'s [mean, sqrt(var)] rows `idx` as float32 (a view when already float32)."""
        return self.g[lab][idx].astype(np.float32, copy=False)


Index = slice | np.ndarray


def data_distance_block(inp: PairwiseInputs, rows: Index, cols: Index = slice(None)) -> np.ndarray:
    """d_data for rows x cols (default all agents), in [0, 1]: (histogram term + embedding term) / 2."""
    sp_r, sp_c = inp.sqrt_p[rows], inp.sqrt_p[cols]  # [B, L], [C, L]
    bc = sp_r @ sp_c.T  # Bhattacharyya coefficient of the label histograms, [B, C]
    hist_term = np.clip(1.0 - bc, 0.0, 1.0)  # squared Hellinger distance
    num = np.zeros_like(bc)
    a = np.empty_like(bc)
    sq_r, sq_c = inp.g_sq[rows], inp.g_sq[cols]
    for lab in range(inp.labels):  # one matmul per label: the B x C x D difference never exists
        # In place from here on: at 10,000 agents each B x C temporary costs a pass over memory.
        w2 = (inp.label_block(lab, rows) @ inp.label_block(lab, cols).T).astype(np.float64)
        w2 *= -2.0
        w2 += sq_r[:, lab][:, None]
        w2 += sq_c[None, :, lab]
        np.maximum(w2, 0.0, out=w2)  # ||x||^2 + ||y||^2 - 2xy can round below zero
        w2 *= -1.0 / (inp.dim * inp.scale)
        np.exp(w2, out=w2)  # exp(-W2^2 / (D s))
        np.multiply.outer(sp_r[:, lab], sp_c[:, lab], out=a)  # sqrt(p_i(l) p_j(l))
        num += a
        a *= w2
        num -= a  # num += a * (1 - exp(-W2^2 / (D s)))
    # Label weights sqrt(p_i(l) p_j(l)) sum to bc; no shared label -> the embedding term is maximal.
    emb_term = np.divide(num, bc, out=np.ones_like(bc), where=bc > 1e-12)
    return 0.5 * (hist_term + emb_term)


def param_distance_block(inp: PairwiseInputs, rows: Index, cols: Index = slice(None)) -> np.ndarray:
    """(1 - cosine similarity of the C updates) / 2, in [0, 1]; a zero update has cosine 0."""
    u_r = inp.unit[rows].astype(np.float32, copy=False)
    u_c = inp.unit[cols].astype(np.float32, copy=False)
    cos = (u_r @ u_c.T).astype(np.float64)
    return np.clip((1.0 - cos) / 2.0, 0.0, 1.0)


def softmax_rows(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def personalized_average(
    inp: PairwiseInputs,
    values: np.ndarray,  # [N, P] trained C of every agent
    lam: float,
    tau: float,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    on_block: Callable[[int], None] | None = None,
) -> np.ndarray:
    """out_i = sum_j softmax_j(-d_ij / tau) values_j with d_ij = lam d_data + (1 - lam) d_param.

    Runs in blocks of rows: peak extra memory is about block_elements floats, whatever N is.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    n = inp.n
    block = max(1, int(block_elements // max(1, n * max(1, inp.labels))))
    out = np.empty((n, values.shape[1]), dtype=np.float64)
    for start in range(0, n, block):
        rows = slice(start, min(n, start + block))
        d = np.zeros((rows.stop - rows.start, n))
        if lam > 0:
            d += lam * data_distance_block(inp, rows)
        if lam < 1:
            d += (1.0 - lam) * param_distance_block(inp, rows)
        # d(i, i) = 0 by definition, also for zero updates or empty histograms.
        d[np.arange(d.shape[0]), np.arange(rows.start, rows.stop)] = 0.0
        w = softmax_rows(-d / tau)
        out[rows] = w @ values
        if on_block is not None:
            on_block(rows.stop - rows.start)
    return out
