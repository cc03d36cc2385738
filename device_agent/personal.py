"""Personal tuning: the device's own copy of the fleet's adapter, trained on its images, held near it.

With `personal.mu > 0` in agent.yaml, whenever the adapter inference uses changes (a signed rollout,
a rollback, an allowed unsigned push) and at every start, the agent trains a copy of that adapter
`w` on its own training split for `personal.epochs` epochs on cross-entropy plus the proximal term
`(mu / 2) ||v - w||^2` (the step graph's `prox_mu` input), keeps it beside `w` in the ledger
(`adapters/<w>.personal.safetensors`, `sdk.ledger`), and the device's inference (`Classifier`)
serves it as `<w>+personal`.

Why: an adapter made for the whole fleet is far below what each device learns alone on its own
label mix, and a device's adapter trained alone forgets every label it has not seen. Tuning the
fleet's adapter on the device's images with the pull toward it keeps most of both: in every fleet of
`benchmarks/results/fmnist_personal.md` (FedAvg-LoRA with balanced softmax underneath, mu 1.5, the
rounds' epochs; in-process and through the real path) all-class accuracy is within 2 points of the
better of zero-shot and FedAvg-LoRA (issue 13's target, which the fleet's personalized strategies
miss by 8-16 points wherever a device holds two labels), at 1.4-3.7 points of own accuracy under
training alone (Ditto, Li et al. 2021, tuned once per installed adapter instead of every round: the
same numbers within about a point in that report).

What it does not change: the copy never leaves the device (its status reports the copy's held-out
accuracy, nothing of its weights or data); what the
device answers still changes only when a signed rollout (or its own data) does: a rollback returns
inference to the previous adapter and that adapter's own copy. Training uses plain cross-entropy
(the copy learns this device's label mix, so inference adds no prior to it) and the step backend
(ORT's training artifacts fix their loss at export; `AgentConfig.training_backend`).

This module holds the settings (agent.yaml's `personal:`); `device_agent.personalize` does the work.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedclip.sdk.errors import ConfigError
from fedclip.sdk.messages import MAX_EPOCHS, MAX_LR, MAX_PROX_MU

# A tuning paused for a message or a stop, in the state dir: `device_agent.personalize` writes and
# resumes them; `fedclip-agent status` reads the record (`paused_tuning`), without the trainer's imports.
WORK_CKPT, WORK_INFO = "personal-work.ckpt", "personal-work.json"


@dataclass(frozen=True)
class PersonalTuning:
    """`personal:` in agent.yaml. The defaults past `mu` are what the benchmark measured (5 rounds x
    3 local epochs of the fleet's lr): set `mu` (1.5 there) to turn it on."""

    mu: float = 0.0  # 0: off
    epochs: int = 15
    lr: float = 5e-3
    batch_size: int = 32
    # While a tuning runs, the retained status carries the epoch it is in at most this often (at
    # epoch starts; besides its start and the status a pause answers with): at ViT-B-32's width a
    # tuning takes minutes, and 10,000 devices tuning at once send 1/60 of a status each a second.
    # 0: at every epoch.
    report_every: float = 60.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mu) and 0.0 <= self.mu <= MAX_PROX_MU):
            raise ConfigError(f"personal.mu: must be in [0, {MAX_PROX_MU:g}] (0: off), got {self.mu}")
        if not 1 <= self.epochs <= MAX_EPOCHS:
            raise ConfigError(f"personal.epochs: must be in [1, {MAX_EPOCHS}], got {self.epochs}")
        if not (math.isfinite(self.lr) and 0.0 < self.lr <= MAX_LR):
            raise ConfigError(f"personal.lr: must be in (0, {MAX_LR:g}], got {self.lr}")
        if self.batch_size < 1:
            raise ConfigError(f"personal.batch_size: must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.report_every < math.inf:  # NaN fails too
            raise ConfigError(
                f"personal.report_every: must be >= 0 seconds and finite, got {self.report_every}"
            )

    @property
    def enabled(self) -> bool:
        return self.mu > 0

    def training(self) -> dict[str, Any]:
        """The settings the copy depends on: a paused tuning resumes only under the same ones."""
        return {k: v for k, v in asdict(self).items() if k != "report_every"}


def paused_tuning(state_dir: str | Path) -> dict[str, Any] | None:
    """The paused tuning a state dir records: `adapter`, the `epoch` it resumes in (from 1) and
    `epochs`; None when there is none (or its record is unreadable: the agent starts that one over)."""
    try:
        work = json.loads((Path(state_dir) / WORK_INFO).read_text())
        return {"adapter": str(work["version"]), "epoch": int(work["epoch"]) + 1,
                "epochs": int(work["settings"]["epochs"])}  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError, OverflowError):  # e.g. an epoch of Infinity
        return None
