"""Everything the federation needs before it starts: the broker (embedded unless given), the data
set partitioned into agents, and the bundle (exported, or a given one checked against the data)."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
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
    username: str | None  # the coordinator's login
    password_file: Path | None
    port: int | None  # the embedded broker's port, checked free again after the run
    kits: dict[str, Path] = field(default_factory=dict)  # agent -> its startup kit (provisioned fleets)


@contextlib.contextmanager
def broker_for(
    cfg: DemoConfig, secrets_dir: Path, coordinator_state: Path, agents: list[str]
) -> Iterator[BrokerInfo]:
    """A given broker as it is, or the embedded one, provisioned: every agent gets a startup kit (its
    own key and broker login), the broker enforces the fleet's logins and topic ACL, and the
    coordinator counts only messages its enrolled agents signed (docs/security.md)."""
    pw_file = None
    if cfg.broker is not None:
        if cfg.password is not None:
            pw_file = write_secret(secrets_dir / "broker-password", cfg.password)
        yield BrokerInfo(cfg.broker, cfg.username, pw_file, None)
        return
    from fedclip.coordinator.provision import COORDINATOR_USER, Provisioner

    prov = Provisioner.init(coordinator_state, cfg.fleet)
    kits = {}
    for aid in agents:
        kits[aid] = prov.add(aid, out=secrets_dir / "kits" / aid, rewrite_brokers=False).path
    broker = prov.embedded_broker()
    broker.start()
    try:
        yield BrokerInfo(
            broker.plain_url, COORDINATOR_USER, prov.coordinator_password_file, broker.port, kits
        )
    finally:
        broker.stop()
        if not wait_port_free(broker.port, timeout_s=10):
            log.warning("port %d of the embedded broker is still taken after stop", broker.port)


def write_secret(path: Path, value: str) -> Path:
    """`value` in a file only this user can read (credentials go in files, never in `ps`)."""
    return atomic_write(path, (value + "\n").encode(), mode=0o600)


def auth_flags(b: BrokerInfo) -> list[str]:
    """The coordinator's login (serve, rollout)."""
    return flags(username=b.username, password_file=b.password_file)


def agent_auth_flags(b: BrokerInfo, agent: str) -> list[str]:
    """An agent's own login and signing key from its kit; the shared login of a given broker else."""
    kit = b.kits.get(agent)
    if kit is None:
        return auth_flags(b)
    from fedclip.coordinator.provision import DEVICE_KEY, KIT_PASSWORD

    return flags(username=agent, password_file=kit / KIT_PASSWORD, device_key=kit / DEVICE_KEY)


# ---- data and bundle ---------------------------------------------------------------------------
def fashion_mnist_installed() -> bool:
    from fedclip.sdk.partition import FASHION_MNIST_DIR

    return all((FASHION_MNIST_DIR / f"{s}-labels-idx1-ubyte.gz").is_file() for s in ("train", "t10k"))


def resolve_dataset(name: str) -> str:
    """The partition command's --dataset for `name`; `auto` picks what this machine has."""
    if name != "auto":
        return name
    if fashion_mnist_installed():
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


def write_all_class(cfg: DemoConfig, data_dir: Path, dataset: str) -> str | None:
    """Each agent's all-class set (`<agent>/all/`, `fedclip.sdk.all_class`); None, or why there is none
    (a data set too small to spare `all_class_per_label` unused images of every label)."""
    from fedclip.sdk.all_class import write_all_class_sets

    try:
        write_all_class_sets(data_dir, dataset, per_label=cfg.all_class_per_label, seed=cfg.seed)
    except DataError as e:
        return f"no all-class sets: {e}"
    return None


def export(cfg: DemoConfig, procs: ProcessGroup, labels: list[str], out: Path) -> Path:
    # A labels file, not a comma list: class names may hold commas.
    labels_file = out.parent / f"{out.name}-labels.txt"
    labels_file.write_text("\n".join(labels) + "\n")
    options = flags(
        model=cfg.model, pretrained=cfg.pretrained, adapter=cfg.adapter, init=cfg.init, rank=cfg.rank,
        alpha=cfg.alpha, targets=cfg.targets, towers=cfg.towers, task="classify", labels=labels_file,
        seed=cfg.seed, out=out,
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
    if cfg.init is not None and manifest.adapter.init != cfg.init:
        raise ConfigError(
            f"--bundle: its tri-lora init is {manifest.adapter.init}; --strategy {cfg.strategy} needs "
            f"a bundle exported with --init {cfg.init}"
        )
    if manifest.task.kind != "classify" or list(manifest.task.labels) != list(labels):
        raise ConfigError(
            f"--bundle: its labels ({', '.join(manifest.task.labels[:5])}, ...) are not the data set's "
            f"({', '.join(labels[:5])}, ...); export it with --labels from the same data set"
        )
    return bundle
