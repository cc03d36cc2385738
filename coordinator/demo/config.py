"""The demo's settings (one frozen dataclass, checked on creation) and how it calls fedclip's
commands: by this interpreter (`python -m ...`), so it works without the venv on PATH."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

from fedclip.sdk.errors import ConfigError, WireError
from fedclip.sdk.label_prior import LOSSES
from fedclip.sdk.messages import MAX_PROX_MU, Hyperparameters

# The strategy the demo runs unless --strategy says otherwise: CE-LoRA as published. In the demo's own
# fleet (4 agents, each its own camera) it keeps the most all-class accuracy (above zero-shot) at the
# fewest bytes; fleet-core gains own accuracy there and loses all-class (docs/demo.md, "Strategies");
# where agents share cameras fleet-lora and fleet-core win (docs/aggregation.md).
DEFAULT_STRATEGY = "ce-lora"

# strategy -> (adapter kind, tri-lora init) the bundle needs; None = the exporter's default init.
# fleet-core mixes cores over A and B that every agent shares frozen, so its bundle is `frozen-seed`.
# tests/test_demo.py checks this names every strategy the coordinator registers.
STRATEGY_BUNDLE: dict[str, tuple[str, str | None]] = {
    "fedavg": ("lora", None),
    "trimmed-mean": ("lora", None),
    "ce-lora": ("tri-lora", None),
    "fleet-core": ("tri-lora", "frozen-seed"),
    "fleet-lora": ("lora", None),
}
# strategy -> (rank, lr) the demo uses unless --rank / --lr say otherwise (alpha: 2 x rank, so the
# adapter's scale alpha / r stays 2). fleet-core trains only r x r cores over a frozen random basis:
# at rank 6 it comes within about a point of fleet-lora's own accuracy in issue 13's fleets (rank 4
# fell 4 points short) and still moves >= 100x fewer bytes than FedAvg-LoRA at ViT-B-32's width,
# every header counted (rank 7 gains a point and drops to 88x); its cores need 30x LoRA's step
# (benchmarks/results/fmnist_fl.md, "Session 12"; wire_bytes.md; docs/aggregation.md).
STRATEGY_SETTINGS: dict[str, tuple[int, float]] = {"fleet-core": (6, 0.15)}
DEFAULT_SETTINGS = (4, 5e-3)
BASES = ("pretrained", "random")
# The agent's default share of its data kept out of training (`AgentConfig.holdout`): local-only
# training keeps out the same images, so it trains on exactly what the agent trained on.
AGENT_HOLDOUT = 0.2

FLEET = "demo"


@dataclass(frozen=True)
class DemoConfig:
    agents: int = 4
    rounds: int = 3
    strategy: str = DEFAULT_STRATEGY
    dataset: str = "auto"
    per_agent: int = 240
    dirichlet: float = 0.5
    shift: str = "per-agent"
    model: str = "fedclip-tiny"
    pretrained: str | None = None
    bundle: Path | None = None
    # Start fedclip-tiny from the cached Fashion-MNIST base (`exporters.base_pretrain`) or random weights.
    base: str = "pretrained"
    base_steps: int = 300  # exporters.base_pretrain.BASE_STEPS (the coordinator may not import the exporters)
    base_cache: Path | None = None  # None: base_pretrain's default (~/.cache/fedclip/base)
    all_class_per_label: int = 20  # images of every label in each agent's all-class set
    # None: the strategy's (STRATEGY_SETTINGS; alpha 2 x rank), resolved when the config is made
    rank: int | None = None
    alpha: float | None = None
    targets: str = "q,v"
    towers: str = "vision,text"
    local_epochs: int = 1
    lr: float | None = None
    # The agents' loss (docs/aggregation.md). Balanced softmax by default: in the demo's own runs
    # (2 strategies x 2 seeds) it kept own accuracy level (-0.6 to +1.0 points) and raised
    # all-class accuracy by 2.0 to 5.4 points (docs/demo.md).
    loss: str = "balanced-softmax"
    # > 0: also tune each agent's final adapter on its own images with this proximal weight
    # (`fedclip-agent train --prox-mu`, what an agent with `personal: {mu}` serves) and show it
    personal_mu: float = 0.0
    # > 0: also score each agent's final adapter as `fedclip-agent serve-inference --open-set` serves
    # it: the label prior only for images like the agent's own training images, the share q of those
    # its gate may send away (docs/inference.md, "Open-set gate"). The product's way to keep labels a
    # device has not trained on (issue 13's all-class target, benchmarks/results/fmnist_open_set_real.md);
    # the agent's default quantile. Only with balanced softmax: without a prior there is nothing to gate.
    open_set_q: float = 0.05
    broker: str | None = None
    username: str | None = None
    password: str | None = None
    round_timeout: float = 120.0
    timeout: float = 900.0
    seed: int = 0
    # ce-lora's data-distance weight and temperature; None = the coordinator's defaults
    lam: float | None = None
    tau: float | None = None
    out: Path = Path("fedclip-demo")
    run_name: str = "run"
    fleet: str = FLEET

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGY_BUNDLE:
            raise ConfigError(f"--strategy: {self.strategy!r} is not one of {', '.join(STRATEGY_BUNDLE)}")
        rank, lr = STRATEGY_SETTINGS.get(self.strategy, DEFAULT_SETTINGS)
        rank = rank if self.rank is None else self.rank
        lr = lr if self.lr is None else self.lr
        # frozen: fill the strategy's settings in once, so every reader sees plain numbers
        object.__setattr__(self, "rank", rank)
        object.__setattr__(self, "alpha", 2.0 * rank if self.alpha is None else self.alpha)
        object.__setattr__(self, "lr", lr)
        if rank < 1:
            raise ConfigError(f"--rank: must be >= 1, got {rank}")
        if self.loss not in LOSSES:
            raise ConfigError(f"--loss: {self.loss!r} is not one of {', '.join(LOSSES)}")
        if self.base not in BASES:
            raise ConfigError(f"--base: {self.base!r} is not one of {', '.join(BASES)}")
        if self.base_steps < 1 or self.all_class_per_label < 1:
            raise ConfigError("--base-steps, --all-class-per-label: must be >= 1")
        if self.shift not in ("none", "per-agent"):
            raise ConfigError(f"--shift: {self.shift!r} is not one of none, per-agent")
        if self.dirichlet <= 0:
            raise ConfigError(f"--dirichlet: must be > 0, got {self.dirichlet}")
        try:  # the bounds every agent applies to a task (and `serve` to its settings), checked here
            Hyperparameters(self.local_epochs, lr, loss=self.loss)
        except WireError as e:
            msg = str(e).replace("hyperparameters: hyperparameters: body field ", "")
            raise ConfigError(f"--lr, --local-epochs: {msg}") from None
        if not (math.isfinite(self.personal_mu) and 0.0 <= self.personal_mu <= MAX_PROX_MU):
            raise ConfigError(
                f"--personal-mu: must be in [0, {MAX_PROX_MU:g}] (0: off), got {self.personal_mu}"
            )
        if not (math.isfinite(self.open_set_q) and 0.0 <= self.open_set_q < 0.5):
            raise ConfigError(f"--open-set-quantile: must be in [0, 0.5) (0: off), got {self.open_set_q}")
        if self.round_timeout <= 0 or self.timeout <= 0:
            raise ConfigError("--round-timeout, --timeout: must be > 0")
        if self.bundle is not None and not (Path(self.bundle) / "manifest.yaml").is_file():
            raise ConfigError(f"--bundle: {self.bundle} is not a bundle folder (no manifest.yaml)")

    @property
    def adapter(self) -> str:
        return STRATEGY_BUNDLE[self.strategy][0]

    @property
    def init(self) -> str | None:
        """The tri-lora init the strategy's bundle needs (None: the exporter's default)."""
        return STRATEGY_BUNDLE[self.strategy][1]

    @property
    def gated(self) -> bool:
        """Whether the comparison has the open-set gate's column (`open_set_q`)."""
        return self.open_set_q > 0 and self.loss == "balanced-softmax"

    @property
    def run_dir(self) -> Path:
        return self.out / "runs" / self.run_name


def _cli(module: str, *args: object) -> list[str]:
    """A fedclip command run by this interpreter, so the demo works without the venv on PATH."""
    return [sys.executable, "-m", module, *(str(a) for a in args)]


def coord_cli(*args: object) -> list[str]:
    return _cli("fedclip.coordinator.cli", *args)


def agent_cli(*args: object) -> list[str]:
    return _cli("fedclip.device_agent.cli", *args)


def base_cli(*args: object) -> list[str]:
    """The pretrained base, made or reused in a child: torch stays out of the demo's process."""
    return _cli("fedclip.exporters.base_pretrain", *args)


def flags(**options: object) -> list[str]:
    """`--name value` pairs for a command line; None is left out, underscores become dashes."""
    out: list[str] = []
    for name, value in options.items():
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    return out
