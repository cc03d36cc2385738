"""Everything the federation needs before it starts: the broker (embedded unless given), the data
set partitioned into agents, and the bundle (exported, or a given one checked against the data)."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fedclip.coordinator.demo.config import DemoConfig, coord_cli, flags
from fedclip.coordinator.procs import ProcessGroup, wait_port_free
from fedclip.sdk.errors import ConfigError, DataError
from fedclip.sdk.fsutil import atomic_write

log = logging.getLogger(__name__)


# ---- broker ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BrokerInfo:
    url: str  # without credentials: those go in flags and a 0600 file, never in `ps`
    username: str | None
    password_file: Path | None
    port: int | None  # the embedded broker's port, checked free again after the run


@contextlib.contextmanager
def broker_for(cfg: DemoConfig, secrets_dir: Path) -> Iterator[BrokerInfo]:
    pw_file = None
    if cfg.broker is not None:
        if cfg.password is not None:
            pw_file = write_secret(secrets_dir / "broker-password", cfg.password)
        yield BrokerInfo(cfg.broker, cfg.username, pw_file, None)
        return
    from fedclip.sdk.broker import EmbeddedBroker

    broker = EmbeddedBroker()
    broker.start()
    try:
        pw_file = write_secret(secrets_dir / "broker-password", broker.password)
        yield BrokerInfo(broker.plain_url, broker.username, pw_file, broker.port)
    finally:
        broker.stop()
        if not wait_port_free(broker.port, timeout_s=10):
            log.warning("port %d of the embedded broker is still taken after stop", broker.port)


def write_secret(path: Path, value: str) -> Path:
    """`value` in a file only this user can read (credentials go in files, never in `ps`)."""
    return atomic_write(path, (value + "\n").encode(), mode=0o600)


def auth_flags(b: BrokerInfo) -> list[str]:
    return flags(username=b.username, password_file=b.password_file)


# ---- data and bundle ---------------------------------------------------------------------------
def resolve_dataset(name: str) -> str:
    """The partition command's --dataset for `name`; `auto` picks what this machine has."""
    from fedclip.sdk.partition import FASHION_MNIST_DIR

    if name != "auto":
        return name
    if all((FASHION_MNIST_DIR / f"{s}-labels-idx1-ubyte.gz").is_file() for s in ("train", "t10k")):
        return "fashion-mnist"
    try:
        import sklearn.datasets  # noqa: F401
    except ImportError:
        raise DataError(
            "no data set found: install Fashion-MNIST (Debian/Ubuntu: "
            "apt-get install dataset-fashion-mnist), or scikit-learn for its digits "
            "(pip install scikit-learn), or pass --dataset imagefolder:PATH"
        ) from None
    return "digits"


def read_partition(data_dir: Path) -> tuple[list[str], list[str]]:
    """(labels, agent ids) of a partition folder written by `fedclip-coord partition`."""
    meta = data_dir / "partition.json"
    if meta.is_file():
        info = json.loads(meta.read_text())
        labels = list(info["labels"])
        agents = list(info.get("agents") or [])
        if isinstance(agents, dict):
            agents = list(agents)
        agents = [a if isinstance(a, str) else a["id"] for a in agents]
    else:
        labels, agents = [], []
    if not agents:
        agents = sorted(p.name for p in data_dir.iterdir() if (p / "train").is_dir())
    if not labels or not agents:
        raise DataError(f"{data_dir}: the partition wrote no labels or no agents")
    return labels, agents


def partition(cfg: DemoConfig, procs: ProcessGroup, out: Path, dataset: str) -> Path:
    options = flags(
        dataset=dataset, agents=cfg.agents, dirichlet=cfg.dirichlet, shift=cfg.shift,
        per_agent=cfg.per_agent, seed=cfg.seed, out=out,
    )  # fmt: skip
    procs.run("partition", coord_cli("partition", *options), timeout_s=300)
    return out


def export(cfg: DemoConfig, procs: ProcessGroup, labels: list[str], out: Path) -> Path:
    # A labels file, not a comma list: class names may hold commas.
    labels_file = out.parent / f"{out.name}-labels.txt"
    labels_file.write_text("\n".join(labels) + "\n")
    options = flags(
        model=cfg.model, pretrained=cfg.pretrained, adapter=cfg.adapter, rank=cfg.rank, alpha=cfg.alpha,
        targets=cfg.targets, towers=cfg.towers, task="classify", labels=labels_file, seed=cfg.seed, out=out,
    )  # fmt: skip
    procs.run("export", coord_cli("export", *options), timeout_s=600)
    return out


def check_bundle(cfg: DemoConfig, bundle: Path, labels: list[str]) -> Path:
    """A given --bundle must fit the strategy and the data, or every agent would fail one by one."""
    from fedclip.sdk.manifest import Manifest

    manifest = Manifest.load(bundle)
    if manifest.adapter.kind != cfg.adapter:
        raise ConfigError(
            f"--bundle: has {manifest.adapter.kind} adapters; --strategy {cfg.strategy} needs {cfg.adapter}"
        )
    if manifest.task.kind != "classify" or list(manifest.task.labels) != list(labels):
        raise ConfigError(
            f"--bundle: its labels ({', '.join(manifest.task.labels[:5])}, ...) are not the data set's "
            f"({', '.join(labels[:5])}, ...); export it with --labels from the same data set"
        )
    return bundle
