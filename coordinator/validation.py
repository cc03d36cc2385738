"""Update validation: pure checks of a decoded update against the manifest and the current round.

Each check raises `WireError` (or `AdapterError` from the tensor check) with a one-line reason that
names the update and what is wrong; the round loop logs it, records it in the `rejections` table and
drops the update. Nothing here touches the store or the network, so every rule is testable alone.
The order follows docs/aggregation.md: envelope agent, selection, base version, bundle id, counts and
metrics, tensors, statistics, update norm.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedclip.coordinator.strategies.aggregate import clip_delta, delta_norm
from fedclip.sdk.adapters import check_tensors
from fedclip.sdk.errors import WireError
from fedclip.sdk.manifest import Manifest
from fedclip.sdk.messages import KNOWN_STATS, STATS_TENSORS, Update
from fedclip.sdk.wire import STAT_LABEL_HIST, STAT_MEAN, Message, tensors_digest


@dataclass(frozen=True)
class NormBound:
    """`max_update_norm` (0: none) and what to do above it: "reject" or "clip"."""

    max_norm: float = 0.0
    action: str = "reject"


@dataclass(frozen=True)
class HeldStats:
    """Statistics the coordinator already holds for an agent, and the data digest they belong to."""

    data_digest: str
    stats: Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Accepted:
    """An update that passed every check, ready to be stored."""

    agent: str
    sha: str  # of the tensors as sent: tells a redelivery from a different update
    tensors: dict[str, np.ndarray]
    stats: dict[str, np.ndarray]
    num_samples: int
    metrics: dict[str, float]
    norm: float
    clipped: bool
    data_digest: str = ""  # body `data_digest`: the agent's data the statistics describe
    stats_sent: bool = False  # the gaussian statistics travelled (not taken from the held ones)


def check_stats(
    msg: Message,
    manifest: Manifest,
    needed: Sequence[str],
    strategy: str,
    where: str,
    *,
    data_digest: str = "",
    held: HeldStats | None = None,
) -> dict[str, np.ndarray]:
    """`stats/*` tensors: only known names, every one the strategy `needed`, shapes from the manifest.

    An update may leave out the gaussian statistics (both of them) when its `data_digest` is the one
    `held` statistics were computed for: those stand in (they passed these checks when they came)."""
    stats = msg.stats
    unknown = sorted(set(stats) - KNOWN_STATS)
    if unknown:
        raise WireError(f"{where}: unknown statistic {unknown[0]!r}")
    reused: dict[str, np.ndarray] = {}
    if "gaussian" in needed and not (set(STATS_TENSORS["gaussian"]) & set(stats)):
        if data_digest and held is not None and held.data_digest == data_digest:
            reused = {n: np.asarray(held.stats[n], np.float32) for n in STATS_TENSORS["gaussian"]}
        else:
            raise WireError(
                f"{where}: statistic {STAT_MEAN!r} is missing ({strategy} needs gaussian) and the "
                f"coordinator holds none for data digest {data_digest[:12] or '(none)'}"
            )
    for kind in needed:
        for name in STATS_TENSORS[kind]:
            if name not in stats and name not in reused:
                raise WireError(f"{where}: statistic {name!r} is missing ({strategy} needs {kind})")
    labels = len(manifest.task.labels)
    dim = manifest.base_model.embed_dim
    out = {}
    for name, arr in stats.items():
        arr = np.asarray(arr)
        if name == STAT_LABEL_HIST:
            expect: tuple[int, ...] = (labels,) if labels else (arr.shape[0],) if arr.ndim == 1 else (-1,)
        else:  # per-label means and variances; contrastive bundles have no labels: the histogram's length
            expect = (labels or (stats[STAT_LABEL_HIST].shape[0] if STAT_LABEL_HIST in stats else -1), dim)
        if arr.dtype.kind != "f" or tuple(arr.shape) != expect:
            raise WireError(
                f"{where}: statistic {name!r} has shape {list(arr.shape)} {arr.dtype}, "
                f"expected {list(expect)} float"
            )
        if name != STAT_MEAN and (arr < 0).any():
            raise WireError(f"{where}: statistic {name!r} has negative values")
        out[name] = arr.astype(np.float32)
    if reused:
        sent_labels = out[STAT_LABEL_HIST].shape[0] if STAT_LABEL_HIST in out else None
        for name, arr in reused.items():  # held for the same data, so only a changed label set differs
            if sent_labels is not None and arr.shape[0] != sent_labels:
                raise WireError(
                    f"{where}: held statistic {name!r} has {arr.shape[0]} labels, the update {sent_labels}"
                )
        out.update(reused)
    return out


def validate_update(
    agent: str,
    msg: Message,
    *,
    round_id: int,
    selected: Mapping[str, str],
    manifest: Manifest,
    strategy: str,
    needed_stats: Sequence[str],
    start_tensors: Callable[[str], Mapping[str, np.ndarray]],
    bound: NormBound = NormBound(),
    held_stats: Callable[[str], HeldStats | None] = lambda agent: None,
    where: str,
) -> Accepted:
    """Every check of an update for the current round `round_id`, whose `selected` maps each selected
    agent to the version its task started from; `start_tensors(version)` gives that version's tensors,
    `held_stats(agent)` the statistics already held for the agent (asked only when an update leans
    on them).
    The caller has already decoded the message (size, schema, fleet, sha256, finite values) and
    matched its round to `round_id`."""
    env = msg.envelope
    if env.agent != agent:
        raise WireError(f"{where}: claims to be from agent {env.agent!r}")
    if agent not in selected:
        raise WireError(f"{where}: agent {agent!r} was not selected for round {round_id}")
    if env.base_version and env.base_version != selected[agent]:
        raise WireError(f"{where}: built on {env.base_version!r}, the task gave {selected[agent]!r}")
    update = Update.parse(msg, where)  # every body field typed and bounded
    if update.bundle_id != manifest.bundle_id:
        raise WireError(
            f"{where}: for bundle {update.bundle_id[:12]}, this round runs {manifest.bundle_id[:12]}"
        )
    tensors = check_tensors(msg.adapter_tensors, manifest.exchanged, where, finite_checked=True)
    data_digest = update.data_digest
    sent = bool(set(STATS_TENSORS["gaussian"]) & set(msg.stats))
    held = held_stats(agent) if "gaussian" in needed_stats and not sent else None
    stats = check_stats(msg, manifest, needed_stats, strategy, where, data_digest=data_digest, held=held)
    base = start_tensors(selected[agent])
    norm = delta_norm(tensors, base)
    clipped = False
    if bound.max_norm and norm > bound.max_norm:
        if bound.action == "reject":
            raise WireError(f"{where}: update norm {norm:.4g} exceeds the bound {bound.max_norm:g}")
        tensors = clip_delta(tensors, base, bound.max_norm)
        clipped = True
    return Accepted(
        agent,
        msg.digest or tensors_digest(msg.tensors),  # `decode` computed it already
        tensors,
        stats,
        update.num_samples,
        dict(update.metrics),
        norm,
        clipped,
        data_digest,
        sent and "gaussian" in needed_stats,
    )
