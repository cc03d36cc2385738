"""ce-lora over each agent's k nearest agents: near-linear personalized aggregation.

`personalized_topk` computes out_i = sum_{j in N_k(i)} softmax_j(-d_ij / tau) values_j, where N_k(i)
are the k agents with the smallest combined distance d_ij (the same d as the all-pairs
`personalized_average`; ties go to the lower index; i itself is always in, d_ii = 0).

Finding N_k(i) without all N^2 distances (docs/aggregation.md, "k nearest agents"):
1. a sketch z_i (~140 floats) whose squared Euclidean distance approximates d: the histogram term
   exactly (squared Hellinger is a Euclidean distance of sqrt(p)), the embedding term linearized and
   the parameter term (||u_i - u_j||^2 / 4 = (1 - cos) / 2 for unit updates) through seeded Gaussian
   projections to 64 dimensions each;
2. k-means on the sketches into clusters of about 4k agents;
3. per cluster, the exact d between its members and every member of its `probe` nearest clusters
   (BLAS matmuls, as in the all-pairs kernel), then the k smallest per row.
The sketch only chooses which exact distances to compute: every weight uses the exact d. With at
most `probe` clusters (N < 4 k (probe + 1)) every pair is a candidate and the result is the exact
top-k. Beyond, a true neighbour outside the probed clusters is missed; the benchmark measures recall.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedclip.coordinator.strategies.aggregate import (
    PairwiseInputs,
    data_distance_block,
    param_distance_block,
)

SKETCH_DIM = 64  # per projected term; JL: squared distances within ~ +-25% (2 / sqrt(64))
PROBE = 3  # clusters searched per cluster, its own included
CLUSTER = 4  # agents per k-means cluster, in units of k
KMEANS_ITERS = 8


def _sketch(inp: PairwiseInputs, lam: float, seed: int = 0) -> np.ndarray:
    """[N, L + 2 * SKETCH_DIM] float32 vectors whose squared distances approximate d."""
    rng = np.random.default_rng(seed)
    n, labels, two_d = inp.n, inp.labels, inp.g.shape[2]
    parts = [np.sqrt(lam / 4.0) * inp.sqrt_p]  # (lam / 4) ||sqrt p_i - sqrt p_j||^2 = lam H / 2
    # Embedding term, linearized (1 - exp(-x) ~ x for near neighbours) with the fleet's label mix:
    # (lam / 2) sum_l pbar_l W2_l^2 / (D s).
    pbar = (inp.sqrt_p**2).mean(axis=0)
    emb = np.zeros((n, SKETCH_DIM), np.float32)
    if lam > 0:
        proj = rng.standard_normal((labels, two_d, SKETCH_DIM)).astype(np.float32)
        proj /= np.sqrt(SKETCH_DIM)
        for lab in range(labels):
            w = np.float32(np.sqrt(lam / 2.0 * pbar[lab] / (inp.dim * inp.scale)))
            emb += (inp.g[lab].astype(np.float32, copy=False) @ proj[lab]) * w
    parts.append(emb)
    par = np.zeros((n, SKETCH_DIM), np.float32)
    if lam < 1:
        proj = rng.standard_normal((inp.unit.shape[1], SKETCH_DIM)).astype(np.float32)
        proj *= np.float32(np.sqrt((1.0 - lam) / 4.0 / SKETCH_DIM))
        for s in range(0, n, 4096):  # row blocks: no float32 copy of a float16 unit matrix
            par[s : s + 4096] = inp.unit[s : s + 4096].astype(np.float32, copy=False) @ proj
    parts.append(par)
    return np.concatenate([p.astype(np.float32) for p in parts], axis=1)


def _sq_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0, out=d)


def kmeans(z: np.ndarray, clusters: int, iters: int = KMEANS_ITERS, seed: int = 0) -> np.ndarray:
    """Cluster label per row (Lloyd's algorithm from a seeded sample); empty clusters are dropped."""
    n = len(z)
    rng = np.random.default_rng(seed)
    centres = z[np.sort(rng.choice(n, size=clusters, replace=False))].copy()
    assign = np.zeros(n, np.int64)
    for _ in range(iters):
        for s in range(0, n, 8192):
            assign[s : s + 8192] = _sq_dist(z[s : s + 8192], centres).argmin(axis=1)
        counts = np.bincount(assign, minlength=len(centres))
        sums = np.zeros_like(centres, dtype=np.float64)
        np.add.at(sums, assign, z)
        keep = counts > 0
        centres = (sums[keep] / counts[keep, None]).astype(np.float32)
        assign = np.cumsum(keep)[assign] - 1  # renumber past dropped clusters
    return assign


def exact_distance(inp: PairwiseInputs, rows: np.ndarray, cols: np.ndarray, lam: float) -> np.ndarray:
    """The combined d (all-pairs formula) for rows x cols, both ascending index arrays; d_ii = 0."""
    d = np.zeros((len(rows), len(cols)))
    if lam > 0:
        d += lam * data_distance_block(inp, rows, cols)
    if lam < 1:
        d += (1.0 - lam) * param_distance_block(inp, rows, cols)
    self_pos = np.searchsorted(cols, rows)
    hit = (self_pos < len(cols)) & (cols[np.minimum(self_pos, len(cols) - 1)] == rows)
    d[np.nonzero(hit)[0], self_pos[hit]] = 0.0
    return d


def _nearest_of(d: np.ndarray, cols: np.ndarray, k: int, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k smallest d (stable: ties to the lower column) as (agent indices, softmax weights)."""
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    dk = np.take_along_axis(d, order, axis=1)
    e = np.exp(-(dk - dk[:, :1]) / tau)  # dk[:, 0] is the row minimum: no overflow
    return cols[order], e / e.sum(axis=1, keepdims=True)


def nearest(
    inp: PairwiseInputs,
    lam: float,
    tau: float,
    k: int,
    probe: int = PROBE,
    block_rows: int = 256,
    on_block: Callable[[int], None] | None = None,
    seed: int = 0,
    cluster: int = CLUSTER,
) -> tuple[np.ndarray, np.ndarray]:
    """Every agent's k nearest agents by d ([N, k] indices) and their weights softmax(-d / tau)."""
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n = inp.n
    k = min(k, n)
    n_clusters = max(1, n // (cluster * k))
    if n_clusters <= probe:  # every pair is a candidate: exact
        groups = [np.arange(n)]
        cands = [np.arange(n)]
    else:
        z = _sketch(inp, lam, seed)
        assign = kmeans(z, n_clusters, seed=seed)
        nc = int(assign.max()) + 1
        centres = np.stack([z[assign == c].mean(axis=0) for c in range(nc)])
        near = np.argsort(_sq_dist(centres, centres), axis=1, kind="stable")[:, :probe]
        members = [np.nonzero(assign == c)[0] for c in range(nc)]
        groups = members
        cands = [np.unique(np.concatenate([members[c] for c in (g, *near[g])])) for g in range(nc)]
    idx = np.empty((n, k), np.int64)
    weights = np.empty((n, k))
    for rows_all, cols in zip(groups, cands, strict=True):
        if len(cols) < k:  # a tiny neighbourhood: widen it to the whole fleet
            cols = np.arange(n)
        for s in range(0, len(rows_all), block_rows):
            rows = rows_all[s : s + block_rows]
            idx[rows], weights[rows] = _nearest_of(exact_distance(inp, rows, cols, lam), cols, k, tau)
            if on_block is not None:
                on_block(len(rows))
    return idx, weights


GATHER_BYTES = 64 << 20  # `mix`'s B x k x P gather per row block stays under this


def mix(values: np.ndarray, idx: np.ndarray, weights: np.ndarray, block_rows: int = 64) -> np.ndarray:
    """out_i = sum_j weights_ij values[idx_ij], float32 [N, P]; a B x k x P gather per row block.

    B is `block_rows` or fewer: at LoRA's widths (P ~ 500,000 at ViT-B-32) 64 rows x 32 neighbours
    gathered 4 GB at once; a block now holds at most GATHER_BYTES, one row at the least (each row's
    sum is computed the same way whatever the block, so the result does not change)."""
    per_row = max(1, idx.shape[1] * values.shape[1] * values.itemsize)
    block_rows = max(1, min(block_rows, GATHER_BYTES // per_row))
    out = np.empty((len(idx), values.shape[1]), np.float32)
    for s in range(0, len(idx), block_rows):
        rows = slice(s, s + block_rows)
        out[rows] = np.einsum("bk,bkp->bp", weights[rows], values[idx[rows]])
    return out


def personalized_topk(
    inp: PairwiseInputs, values: np.ndarray, lam: float, tau: float, k: int, **kw
) -> np.ndarray:
    """Personalized C's over each agent's k nearest agents (`nearest`, then `mix`)."""
    return mix(values, *nearest(inp, lam, tau, k, **kw))
