"""FMNIST-FL: learning quality, bytes and time of fedclip's methods on non-IID Fashion-MNIST clients.

    python benchmarks/fmnist_fl.py                      # full protocol (10 agents, 3 seeds)
    python benchmarks/fmnist_fl.py --rounds 3 --seeds 0 # reduced scale; the report says so

Protocol (see benchmarks/results/fmnist_fl.md for the numbers and what they mean):
1. Base model: `fedclip-tiny` pretrained contrastively on a public split of Fashion-MNIST (the
   official train set) for a fixed budget (`fmnist_base.py`); no pretrained CLIP weights can be
   downloaded here. With real open_clip weights, pass `--model NAME --pretrained FILE|TAG` and
   `--no-pretrain`: everything else runs unchanged on them.
2. Clients: `--agents` (10) agents from the official test set, label skew Dirichlet(`--beta` 0.1) and
   a per-agent camera shift; each agent is scored on its own held-out test split.
3. Methods, same base, same local epochs, batch size and rounds: zero-shot; local-only LoRA
   (`fedclip-agent train`, rounds x epochs, no federation); FedAvg-LoRA on the text tower only and
   on both towers; CE-LoRA (tri-LoRA, personalized aggregation); full fine-tuning with FedAvg
   (PyTorch, in-process: `fmnist_fullft.py`). Federated LoRA methods run through the real
   coordinator, agent processes and embedded MQTT broker (`fedclip.coordinator.demo`).
4. Report: mean and worst-agent personalized accuracy, uplink+downlink bytes per round and in
   total, wall time per round and to reach a target accuracy, peak agent RSS; spread over seeds.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fmnist_base import BASE_STEPS  # noqa: E402
from fmnist_report import ORDER, write_report  # noqa: E402

from fedclip.coordinator.demo import (  # noqa: E402
    DemoConfig,
    FleetRun,
    accuracy_per_round,
    agent_cli,
    broker_for,
    deliver_final,
    export,
    finish_eval,
    flags,
    round_costs,
    run_federation,
    spawn_eval,
)
from fedclip.coordinator.procs import ProcessGroup, procs_wait, sigterm_as_interrupt  # noqa: E402

HERE = Path(__file__).resolve().parent

# name -> (strategy, adapter towers); the adapter kind follows the strategy (DemoConfig.adapter)
FEDERATED = {
    "fedavg-lora-text": ("fedavg", "text"),
    "fedavg-lora-both": ("fedavg", "vision,text"),
    "ce-lora": ("ce-lora", "vision,text"),
    "ce-lora-bsm": ("ce-lora", "vision,text"),
    "fleet-lora": ("fleet-lora", "vision,text"),  # run by fmnist_fl_regimes.py (issue 13)
    # the same with `--loss balanced-softmax` (a name ending in BSM): agents add their prior back
    "fleet-lora-bsm": ("fleet-lora", "vision,text"),
    "fedavg-lora-both-bsm": ("fedavg", "vision,text"),
    # fleet-core over a rank-r frozen basis, r in the name (its own bundle: fmnist_fl_regimes.core_setup)
    **{f"fleet-core-r{r}{bsm}": ("fleet-core", "vision,text") for r in (6, 7) for bsm in ("", "-bsm")},
}
BSM = "-bsm"
ALL_METHODS = ORDER  # fmnist_report's rows: the -bsm ones train with the coordinator's default loss


class RssSampler:
    """Peak resident memory of the agent processes of a ProcessGroup, sampled every 0.5 s."""

    def __init__(self, procs: ProcessGroup, prefix: str = "agent-") -> None:
        self.procs, self.prefix = procs, prefix
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            for c in list(self.procs.children):
                if not c.name.startswith(self.prefix) or c.proc.poll() is not None:
                    continue
                try:
                    rss = psutil.Process(c.pid).memory_info().rss
                except psutil.Error:
                    continue
                self.peak[c.name] = max(self.peak.get(c.name, 0), rss)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def run_federated(
    name: str, cfg: DemoConfig, bundle: Path, data_dir: Path, agents: list[str], work: Path
) -> dict:
    strategy, _ = FEDERATED[name]
    # plain CE unless the method says otherwise (the demo's default is balanced softmax)
    cfg = replace(cfg, strategy=strategy, loss="balanced-softmax" if name.endswith(BSM) else "ce")
    with (
        sigterm_as_interrupt(),
        broker_for(cfg, work / "secrets", work / "coordinator", agents) as broker,
        ProcessGroup(log_dir=work / "logs") as procs,
    ):
        with RssSampler(procs) as rss:
            run = run_federation(cfg, procs, broker, bundle, data_dir, agents, work, console=None)
            run.final_missing = deliver_final(cfg, procs, broker, run)
        procs.stop_all()
        run.costs = round_costs(run.coordinator_state)
        acc = accuracy_per_round(procs, bundle, data_dir, run, cfg.rounds, console=None)
    res = _result(name, run, acc, rss.peak)
    res["exchanged_tensor_bytes"] = exchanged_bytes(bundle)
    res["agents_per_round"] = len(agents)
    return res


def exchanged_bytes(bundle: Path) -> int:
    """Bytes of the adapter tensors one agent sends (and receives) per round, from the manifest."""
    import math

    from fedclip.sdk.manifest import Manifest

    return sum(math.prod(t.shape) * 4 for t in Manifest.load(bundle, verify=False).exchanged)


def _result(name: str, run: FleetRun, acc: dict, peak: dict[str, int]) -> dict:
    costs = [run.costs.get(r["round"], {}) for r in run.rounds]
    return {
        "method": name,
        "accuracy_per_round": acc,
        "round_seconds": [c.get("seconds") for c in costs],
        "uplink_bytes_per_round": [c.get("uplink_bytes") for c in costs],
        "downlink_bytes_per_round": [c.get("downlink_bytes") for c in costs],
        "final_missing": run.final_missing,
        "peak_agent_rss_bytes": max(peak.values()) if peak else None,
        "federation_seconds": run.seconds,
        "agent_metrics_per_round": [r.get("metrics", {}) for r in run.rounds],
    }


def run_local(
    cfg: DemoConfig,
    bundle: Path,
    data_dir: Path,
    agents: list[str],
    work: Path,
    loss: str = "ce",
    start: Mapping[str, Path | None] | None = None,
    prox_mu: float = 0.0,
    name: str = "local-lora",
) -> dict:
    """Local-only LoRA: each agent trains alone for rounds x local epochs (with `loss`), then is
    evaluated (a balanced-softmax adapter carries its label prior, and the evaluation adds it).
    With `start` and `prox_mu` (personal tuning, docs/aggregation.md): each agent trains from its
    adapter in `start` with the proximal term toward it, `fedclip-agent train --prox-mu`, the trainer
    an agent with `personal:` runs when a rollout installs that adapter ("before" is then `start`'s)."""
    acc: dict[str, list[float | None]] = {}
    peak: dict[str, int] = {}
    seconds = []
    with ProcessGroup(log_dir=work / "logs") as procs:
        for a in agents:
            out = work / "adapters" / f"{a}.safetensors"
            out.parent.mkdir(parents=True, exist_ok=True)
            first = start.get(a) if start else None
            options = flags(
                bundle=bundle, data=data_dir / a / "train", epochs=cfg.rounds * cfg.local_epochs, lr=cfg.lr,
                batch_size=32, holdout=0.2, seed=cfg.seed, out=out, threads=1, loss=loss, adapter=first,
                prox_mu=prox_mu or None,
            )  # fmt: skip
            t0 = time.monotonic()
            argv = agent_cli("train", *options, "--quiet", "--json")
            child = procs.spawn(f"agent-{a}-train", argv, capture=True)
            while child.proc.poll() is None:
                try:
                    peak[a] = max(peak.get(a, 0), psutil.Process(child.pid).memory_info().rss)
                except psutil.Error:
                    pass
                time.sleep(0.2)
            procs_wait(child, 600)
            seconds.append(time.monotonic() - t0)
            cache = work / "eval-embeddings" / a
            before = finish_eval(
                spawn_eval(procs, f"eval-{a}-r0", bundle, data_dir / a / "test", first, cache)
            )
            after = finish_eval(
                spawn_eval(procs, f"eval-{a}-local", bundle, data_dir / a / "test", out, cache)
            )
            acc[a] = [float(before["accuracy"]), float(after["accuracy"])]
    return {
        "method": name,
        "accuracy_per_round": acc,
        "train_seconds_per_agent": seconds,
        "round_seconds": [],
        "uplink_bytes_per_round": [],
        "downlink_bytes_per_round": [],
        "peak_agent_rss_bytes": max(peak.values()) if peak else None,
    }


def run_zero_shot(bundle: Path, data_dir: Path, agents: list[str], work: Path) -> dict:
    with ProcessGroup(log_dir=work / "logs") as procs:

        def start(a: str):
            return spawn_eval(procs, f"eval-{a}", bundle, data_dir / a / "test", None, work / "cache" / a)

        evals = {a: start(a) for a in agents[:2]}
        acc = {}
        for i, a in enumerate(agents):  # two at a time
            acc[a] = [float(finish_eval(evals.pop(a))["accuracy"])]
            if i + 2 < len(agents):
                nxt = agents[i + 2]
                evals[nxt] = start(nxt)
    return {
        "method": "zero-shot",
        "accuracy_per_round": acc,
        "round_seconds": [],
        "uplink_bytes_per_round": [],
    }


def run_fullft(pretrained: str, data_dir: Path, cfg: DemoConfig, lr: float) -> dict:
    argv = [
        sys.executable, str(HERE / "fmnist_fullft.py"), "--pretrained", pretrained, "--data", str(data_dir),
        "--rounds", str(cfg.rounds), "--local-epochs", str(cfg.local_epochs), "--lr", str(lr),
        "--seed", str(cfg.seed),
    ]  # fmt: skip
    r = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"full fine-tuning baseline failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def make_partition(pool, out: Path, agents: int, beta: float, per_agent: int, seed: int) -> Path:
    from fedclip.sdk.partition import write_partition

    write_partition(out, pool, agents, beta, shift="per-agent", seed=seed, max_per_agent=per_agent)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=10)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--per-agent", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=5e-3, help="LoRA learning rate (agents)")
    ap.add_argument("--fullft-lr", type=float, default=1e-4, help="full fine-tuning learning rate")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--lam", type=float, default=None, help="ce-lora data weight (default: coordinator)")
    ap.add_argument("--tau", type=float, default=None, help="ce-lora temperature (coordinator default)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    ap.add_argument("--model", default="fedclip-tiny")
    ap.add_argument("--pretrained", default=None, help="use these weights instead of pretraining")
    ap.add_argument("--public-n", type=int, default=5000)
    ap.add_argument("--pretrain-steps", type=int, default=BASE_STEPS)
    ap.add_argument("--target", type=float, default=None, help="target mean accuracy (default: see report)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/fedclip-fmnist-fl"))
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--note", default="", help="added to the report (e.g. why the scale is reduced)")
    ap.add_argument("--resume", action="store_true", help="keep finished results in --out and run the rest")
    args = ap.parse_args()

    from fmnist_base import pretrain_base, split_fmnist

    done: dict[int, dict[str, dict]] = {}
    base_info = None
    if args.resume and (args.out / "fmnist_fl.json").is_file():
        # Keep finished (seed, method) results and the base model; run only what is missing.
        prev = json.loads((args.out / "fmnist_fl.json").read_text())
        _check_same_protocol(prev["protocol"], args)
        done = {int(s): r for s, r in prev["results"].items()}
        base_info = prev.get("base")
    elif args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    pretrained = args.pretrained
    if pretrained is None and base_info and Path(base_info["weights"]).is_file():
        pretrained = base_info["weights"]
    elif pretrained is None:
        print(
            f"pretraining {args.model}: {args.public_n} public images, {args.pretrain_steps} steps",
            flush=True,
        )
        base_info = pretrain_base(args.work / "base" / "fmnist-tiny.pt", args.public_n, args.pretrain_steps)
        pretrained = base_info["weights"]
        print(f"  zero-shot on the client pool: {base_info['zero_shot_pool_accuracy']:.3f}", flush=True)
    _, pool = split_fmnist(args.public_n)
    results: dict[int, dict[str, dict]] = done
    for seed in args.seeds:
        sw = args.work / f"seed-{seed}"
        if (sw / "data" / "partition.json").is_file():
            data_dir = sw / "data"  # the same seed writes the same files
        else:
            data_dir = make_partition(pool, sw / "data", args.agents, args.beta, args.per_agent, seed)
        summary = json.loads((data_dir / "partition.json").read_text())
        labels, agents = summary["labels"], summary["agents"]
        base_cfg = DemoConfig(
            agents=args.agents, rounds=args.rounds, local_epochs=args.local_epochs, lr=args.lr,
            rank=args.rank, alpha=2.0 * args.rank, model=args.model, pretrained=pretrained, seed=seed,
            lam=args.lam, tau=args.tau,
            round_timeout=600, timeout=3600, out=sw, run_name="-",
        )  # fmt: skip
        bundles = {}
        with ProcessGroup(log_dir=sw / "logs") as procs:
            for kind, towers in (("lora", "text"), ("lora", "vision,text"), ("tri-lora", "vision,text")):
                strategy = "ce-lora" if kind == "tri-lora" else "fedavg"
                cfg = replace(base_cfg, strategy=strategy, towers=towers)
                out = sw / f"bundle-{kind}-{towers.replace(',', '+')}"
                if (out / "manifest.yaml").is_file():
                    bundles[(kind, towers)] = out
                    continue
                shutil.rmtree(out, ignore_errors=True)
                print(f"seed {seed}: exporting {kind} on {towers}", flush=True)
                bundles[(kind, towers)] = export(cfg, procs, labels, out)
        results.setdefault(seed, {})
        for method in args.methods:
            if method in results[seed]:
                continue
            shutil.rmtree(sw / method, ignore_errors=True)
            print(f"seed {seed}: {method}", flush=True)
            t0 = time.monotonic()
            mw = sw / method
            if method == "zero-shot":
                res = run_zero_shot(bundles[("lora", "vision,text")], data_dir, agents, mw)
            elif method == "local-lora":
                res = run_local(base_cfg, bundles[("lora", "vision,text")], data_dir, agents, mw)
            elif method == "full-ft-fedavg":
                res = run_fullft(pretrained, data_dir, base_cfg, args.fullft_lr)
            else:
                strategy, towers = FEDERATED[method]
                kind = "tri-lora" if strategy == "ce-lora" else "lora"
                cfg = replace(base_cfg, towers=towers)
                res = run_federated(method, cfg, bundles[(kind, towers)], data_dir, agents, mw)
            res["method_seconds"] = time.monotonic() - t0
            results[seed][method] = res
            final = [v[-1] for v in res["accuracy_per_round"].values()]
            print(f"  mean {sum(final) / len(final):.3f} worst {min(final):.3f} "
                  f"({res['method_seconds']:.0f}s)", flush=True)  # fmt: skip
            # Keep what is done, so an interrupted run still leaves numbers behind.
            _save(args, base_info, results, t_start)
    _save(args, base_info, results, t_start)
    write_report(args.out, json.loads((args.out / "fmnist_fl.json").read_text()))
    print(f"report: {args.out / 'fmnist_fl.md'}")


_PROTOCOL_KEYS = ("agents", "beta", "per_agent", "rounds", "local_epochs", "lr", "fullft_lr", "rank", "model")


def _check_same_protocol(prev: dict, args) -> None:
    """--resume mixes results of two runs: only sound when they ran the same protocol."""
    differ = [k for k in _PROTOCOL_KEYS if prev.get(k) != getattr(args, k)]
    differ += [k for k in ("lam", "tau") if prev.get(k) != getattr(args, k)]
    if differ:
        sys.exit(f"--resume: {args.out / 'fmnist_fl.json'} ran another protocol ({', '.join(differ)} differ)")


def _save(args, base_info, results, t_start) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {
        "protocol": {
            "agents": args.agents,
            "beta": args.beta,
            "per_agent": args.per_agent,
            "rounds": args.rounds,
            "local_epochs": args.local_epochs,
            "lr": args.lr,
            "fullft_lr": args.fullft_lr,
            "rank": args.rank,
            "lam": args.lam,
            "tau": args.tau,
            "seeds": args.seeds,
            "methods": args.methods,
            "model": args.model,
            "batch_size": 32,
            "target": args.target,
            "note": args.note,
        },  # fmt: skip
        "base": base_info,
        "machine": {
            "cpus": psutil.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "results": {str(s): r for s, r in results.items()},
        "total_seconds": time.monotonic() - t_start,
    }
    (args.out / "fmnist_fl.json").write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
