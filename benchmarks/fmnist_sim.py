"""FMNIST-FL regimes in one process: the fleet's math with the coordinator's own strategies.

    nice -n 19 python benchmarks/fmnist_sim.py --regime scarce --per-agent 32 --seeds 0 1 2

Why in-process: the real path (coordinator, agent processes, MQTT) costs minutes per method and
seed on two shared cores; the regimes x methods x seeds grid does not fit. Here every agent trains
the same adapter (LoRALinear injected by the exporter's `inject_adapters`, the bundle's classify
loss, AdamW with the step graph's constants, moments reset each round, batch 32) in torch, and the
updates are aggregated by the registered coordinator strategies (`fedclip.coordinator.strategies`:
the same `aggregate()` the server calls). `fmnist_fl.py` confirms a method through the real path.

Methods (`METHODS`): zero-shot; local-only LoRA; FedAvg-LoRA (A and B averaged); CE-LoRA (tri-LoRA,
A and B personal, C mixed); fleet-core (tri-LoRA with frozen shared A, B from the bundle seed: the
update B C A is linear in C, so mixing cores mixes weight updates exactly; cores mixed by data
similarity and blended with the fleet mean); fleet-lora (plain LoRA, A and B of every module mixed
by data similarity: each camera group averages its whole adapters); local-only C (the same adapter
as fleet-core, alone). Each agent is
scored every round on its own held-out split and on the balanced all-class set under its shift;
methods with a global adapter also on the balanced unshifted set.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fmnist_regimes import AgentData, Fleet, make_fleet  # noqa: E402

from fedclip.coordinator import strategies  # noqa: E402
from fedclip.coordinator.strategies import StrategyOptions, Update  # noqa: E402
from fedclip.coordinator.strategies.fleet_mix import newcomer_weights  # noqa: E402
from fedclip.sdk.wire import STAT_LABEL_HIST, STAT_MEAN, STAT_VAR  # noqa: E402

HERE = Path(__file__).resolve().parent
MIXING = ("fleet-core", "fleet-lora")  # strategies whose newcomers get a statistics-weighted mix


@dataclass(frozen=True)
class Method:
    kind: str  # lora | tri-lora
    init: str = "ce-lora"  # tri-lora: ce-lora (A, B, C trained) | frozen-seed (C only)
    strategy: str | None = None  # None = local only
    lr_scale: float = 1.0
    options: tuple = ()  # extra strategy constructor kwargs
    rank: int | None = None  # None: --rank


METHODS = {
    "local-lora": Method("lora"),
    "fedavg-lora": Method("lora", strategy="fedavg"),
    "ce-lora": Method("tri-lora", strategy="ce-lora"),
    "local-core": Method("tri-lora", "frozen-seed", lr_scale=4.0),
    "fleet-core": Method("tri-lora", "frozen-seed", "fleet-core", lr_scale=4.0),
    # The whole LoRA adapter (A and B) mixed by data similarity (the fleet-lora strategy).
    "fleet-lora": Method("lora", strategy="fleet-lora"),
    # fleet-core over a rank-6 / rank-7 frozen basis (session 12): 36 / 49 core numbers a module; at
    # ViT-B-32's width 142x / 104x fewer tensor numbers than LoRA r 4's A and B, and on the wire with
    # every header and statistic 109x / 88x (results/wire_bytes.md)
    "fleet-core-r6": Method("tri-lora", "frozen-seed", "fleet-core", lr_scale=4.0, rank=6),
    "fleet-core-r7": Method("tri-lora", "frozen-seed", "fleet-core", lr_scale=4.0, rank=7),
}


class Model:
    """One adapted fedclip-tiny classify graph; adapters are swapped in as numpy dicts."""

    def __init__(
        self, pretrained: str, classes, kind: str, init: str, rank: int, seed: int,
        targets: tuple[str, ...] = ("q", "v"),
    ) -> None:  # fmt: skip
        from fedclip.exporters.bundle import tokenize
        from fedclip.exporters.lora import adapter_tensors, inject_adapters, trainable_factors
        from fedclip.exporters.models import build_base_model
        from fedclip.exporters.tasks import ClassifyGraph
        from fedclip.sdk.manifest import AdapterSpec

        base = build_base_model("fedclip-tiny", pretrained)
        # `targets`: the exporter's (q, k, v, o of attention, mlp); q, v is fedclip's default
        self.spec = AdapterSpec(kind, rank, 2.0 * rank, targets, ("vision", "text"), init, seed)
        inject_adapters(base.model, self.spec)
        tokens = tokenize([f"a photo of a {c}." for c in classes], base.context_length)
        self.graph = ClassifyGraph(base.model, tokens, from_embeds=False, text_adapted=True)
        self.params = {
            n: p for n, p in base.model.named_parameters() if n.rsplit(".", 1)[-1].startswith("lora_")
        }
        self.trainable = [n for n, p in self.params.items() if p.requires_grad]
        tri = kind == "tri-lora"
        self.exchanged = sorted(n for n in self.params if not tri or n.endswith("lora_C"))
        self.init = adapter_tensors(base.model)
        self.factors = trainable_factors(self.spec)

    @torch.no_grad()
    def load(self, tensors: dict) -> None:
        for n, v in tensors.items():
            self.params[n].copy_(torch.as_tensor(np.asarray(v, dtype=np.float32)))

    def state(self) -> dict:
        return {n: p.detach().numpy().copy() for n, p in self.params.items()}

    def exchanged_size(self) -> int:
        """How many numbers an update carries (the exchanged tensors')."""
        return int(sum(np.asarray(self.init[n]).size for n in self.exchanged))

    def train(
        self, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int, bias=None,
        anchor: dict | None = None, mu: float = 0.0, pull: float = 0.0,
    ) -> None:  # fmt: skip
        """`bias` ([N, L], optional): added to each image's logits before the loss (fmnist_ceiling).
        `anchor` (tensors by name, fmnist_personal): with `mu` the loss gains the proximal term
        (mu / 2) ||w - anchor||^2 over the trainable tensors (Ditto's); with `pull` every step is
        followed by w -= pull (w - anchor) (the same pull outside the optimizer)."""
        ps = [self.params[n] for n in self.trainable]
        anc = (
            [torch.as_tensor(np.asarray(anchor[n], dtype=np.float32)) for n in self.trainable]
            if anchor
            else []
        )
        opt = torch.optim.AdamW(ps, lr=lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)
        gen = torch.Generator().manual_seed(seed)
        self.graph.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(y), generator=gen).split(32):
                logits = self.graph.logits(x[idx])
                loss = F.cross_entropy(logits if bias is None else logits + bias[idx], y[idx])
                if anc and mu:
                    loss = loss + 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(ps, anc, strict=True))
                opt.zero_grad()
                loss.backward()
                opt.step()
                if anc and pull:
                    with torch.no_grad():
                        for p, a in zip(ps, anc, strict=True):
                            p.sub_(pull * (p - a))

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        self.graph.eval()
        return self.graph.logits(x)

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float((self.logits(x).argmax(-1) == y).float().mean()) if len(y) else float("nan")

    @torch.no_grad()
    def stats(self, a: AgentData) -> dict:
        """The agent's data statistics (label histogram, per-label Gaussian of image embeddings)."""
        self.graph.eval()
        emb = self.graph.encode_image(a.train_x).double().numpy()
        y = a.train_y.numpy()
        counts = np.bincount(y, minlength=10).astype(np.float64)
        mean = np.zeros((10, emb.shape[1]))
        sq = np.zeros_like(mean)
        np.add.at(mean, y, emb)
        np.add.at(sq, y, emb * emb)
        mean /= np.maximum(counts, 1)[:, None]
        var = np.maximum(sq / np.maximum(counts, 1)[:, None] - mean * mean, 0.0)
        return {STAT_LABEL_HIST: counts.astype(np.float32), STAT_MEAN: mean.astype(np.float32),
                STAT_VAR: var.astype(np.float32)}  # fmt: skip


def _score(model: Model, a: AgentData) -> tuple[float, float]:
    return model.accuracy(a.own_x, a.own_y), model.accuracy(a.all_x, a.all_y)


def run_method(name: str, m: Method, fleet: Fleet, args, seed: int, models: dict) -> dict:
    rank = m.rank or args.rank
    key = (m.kind, m.init, rank)
    if key not in models:
        models[key] = Model(args.pretrained, CLASSES, m.kind, m.init, rank, seed)
    model = models[key]
    lr = args.lr * m.lr_scale
    model.load(model.init)
    stats = {a.name: model.stats(a) for a in fleet.agents + fleet.newcomers}  # base-model embeddings
    own = {a.name: [] for a in fleet.agents}
    alls = {a.name: [] for a in fleet.agents}
    glob: list[float] = []
    for a in fleet.agents:
        o, al = _score(model, a)
        own[a.name].append(o)
        alls[a.name].append(al)
    glob.append(model.accuracy(fleet.global_x, fleet.global_y))
    local = {a.name: dict(model.init) for a in fleet.agents}  # each agent's full adapter
    out: dict = {"method": name}
    if m.strategy is None:  # alone: rounds x epochs in one go
        for i, a in enumerate(fleet.agents):
            model.load(model.init)
            model.train(a.train_x, a.train_y, args.rounds * args.local_epochs, lr, seed * 1000 + i)
            local[a.name] = model.state()
            o, al = _score(model, a)
            own[a.name].append(o)
            alls[a.name].append(al)
        out.update(own=own, all=alls, global_=glob)
        out["cold_start"] = _cold_local(model, fleet, args, lr, seed)
        return out
    strat = strategies.create(m.strategy, StrategyOptions(lam=args.lam, tau=args.tau, seed=seed))
    for key_, val in m.options:
        setattr(strat, key_, val)
    glob_t = {n: model.init[n] for n in model.exchanged}
    personal: dict[str, dict] = {}
    for r in range(1, args.rounds + 1):
        glob_t, personal = fleet_round(
            model, strat, fleet, r, args.local_epochs, lr, seed, local, personal, glob_t, stats
        )
        for a in fleet.agents:
            model.load({**local[a.name], **personal.get(a.name, glob_t)})
            o, al = _score(model, a)
            own[a.name].append(o)
            alls[a.name].append(al)
        model.load({**model.init, **glob_t})
        glob.append(model.accuracy(fleet.global_x, fleet.global_y))
        mo, ma = np.mean([v[-1] for v in own.values()]), np.mean([v[-1] for v in alls.values()])
        print(f"    {name} r{r}: own {mo:.3f} all {ma:.3f} global {glob[-1]:.3f}", flush=True)
    out.update(own=own, all=alls, global_=glob)
    if m.strategy in MIXING:
        out["inference_mix"] = _inference_mix(model, fleet, local, personal, glob_t)
    if fleet.newcomers:
        out["cold_start"] = _cold_join(model, strat, fleet, args, lr, seed, local, personal, glob_t, stats)
    return out


def fleet_round(
    model: Model, strat, fleet: Fleet, r: int, epochs: int, lr: float, seed: int,
    local: dict, personal: dict, glob_t: dict, stats: dict, biases: dict | None = None,
) -> tuple[dict, dict]:  # fmt: skip
    """Round `r`: each agent trains from its personal adapter (else the global one) over its own
    tensors in `local`, which it updates (`biases`: an agent's logit bias for `Model.train`), and
    the strategy aggregates; returns (global tensors, personal tensors by agent)."""
    updates = []
    for i, a in enumerate(fleet.agents):
        start = {**local[a.name], **personal.get(a.name, glob_t)}
        model.load(start)
        bias = None if biases is None else biases[a.name]
        model.train(a.train_x, a.train_y, epochs, lr, seed * 1000 + 100 * r + i, bias)
        local[a.name] = model.state()
        updates.append(Update(
            a.name, len(a.train_y), {n: local[a.name][n] for n in model.exchanged},
            {n: start[n] for n in model.exchanged}, stats[a.name] if strat.stats else {},
        ))  # fmt: skip
    res = strat.aggregate(r, updates)
    return res.global_tensors, {k: dict(v) for k, v in res.per_agent.items()}


def _inference_mix(model: Model, fleet: Fleet, local: dict, personal: dict, glob_t: dict) -> dict:
    """Own and all-class accuracy (means over agents) of the personal adapter mixed with the fleet's.

    Tri-LoRA over the frozen shared basis: the weights (1 - h) C_i + h Cbar (the adapter is linear
    in C, so this mixes the two weight updates exactly). Plain LoRA (A and B are not linear in the
    update): the logits, (1 - h) logits_personal + h logits_fleet, two forward passes.
    """
    res = {}
    linear = model.spec.kind == "tri-lora"
    for h in (0.25, 0.5, 0.75, 1.0):
        scores = []
        for a in fleet.agents:
            if linear:
                mixed = {n: (1 - h) * personal[a.name][n] + h * glob_t[n] for n in model.exchanged}
                model.load({**local[a.name], **mixed})
                scores.append(_score(model, a))
                continue
            own, alls = [], []
            for adapter in ({**local[a.name], **personal[a.name]}, {**local[a.name], **glob_t}):
                model.load(adapter)
                own.append(model.logits(a.own_x))
                alls.append(model.logits(a.all_x))
            mix_own, mix_all = (1 - h) * own[0] + h * own[1], (1 - h) * alls[0] + h * alls[1]
            scores.append((_hits(mix_own, a.own_y), _hits(mix_all, a.all_y)))
        res[str(h)] = {
            "own": float(np.mean([s[0] for s in scores])),
            "all": float(np.mean([s[1] for s in scores])),
        }
    return res


def _hits(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(-1) == y).float().mean()) if len(y) else float("nan")


def _cold_local(model: Model, fleet: Fleet, args, lr: float, seed: int) -> dict:
    res = {}
    for j, a in enumerate(fleet.newcomers):
        model.load(model.init)
        model.train(a.train_x, a.train_y, args.rounds * args.local_epochs, lr, seed * 7000 + j)
        res[a.name] = {"after_local": _score(model, a)}
    return res


def _cold_join(model, strat, fleet, args, lr, seed, local, personal, glob_t, stats) -> dict:
    """What a newcomer gets on joining and after one local round, per method."""
    res = {}
    names = [a.name for a in fleet.agents]
    for j, a in enumerate(fleet.newcomers):
        if strat.name in MIXING:
            st = [stats[n] for n in names] + [stats[a.name]]
            w = newcomer_weights(np.stack([s[STAT_LABEL_HIST] for s in st]),
                                 [s[STAT_MEAN] for s in st], [s[STAT_VAR] for s in st], args.tau)  # fmt: skip
            g = strat.fleet_weight
            join = {n: (1 - g) * sum(w[k] * personal[names[k]][n] for k in range(len(names))) + g * glob_t[n]
                    for n in model.exchanged}  # fmt: skip
        else:
            join = dict(glob_t)
        start = {**model.init, **join}
        model.load(start)
        on_join = _score(model, a)
        model.train(a.train_x, a.train_y, args.local_epochs, lr, seed * 7000 + j)
        res[a.name] = {"on_join": on_join, "after_one_round": _score(model, a)}
    return res


def full_weights(model: Model) -> Model:
    """`model` made to train and swap every weight but the token table (full fine-tuning); its
    adapters stay at their init (B = 0: no effect)."""
    weights = {
        n: p for n, p in model.graph.named_parameters() if "lora_" not in n and "token_embedding" not in n
    }
    for p in weights.values():
        p.requires_grad_(True)
    model.params = weights
    model.trainable = list(weights)
    return model


def run_fullft(fleet: Fleet, args, seed: int) -> dict:
    """Full fine-tuning with FedAvg (every weight but the token table trains and travels)."""
    model = full_weights(Model(args.pretrained, CLASSES, "lora", "ce-lora", args.rank, seed))
    glob_t = model.state()
    n = np.array([len(a.train_y) for a in fleet.agents], dtype=np.float64)
    own = {a.name: [_score(model, a)[0]] for a in fleet.agents}
    alls = {a.name: [_score(model, a)[1]] for a in fleet.agents}
    glob = [model.accuracy(fleet.global_x, fleet.global_y)]
    for r in range(1, args.rounds + 1):
        acc = {k: np.zeros_like(v, dtype=np.float64) for k, v in glob_t.items()}
        for i, a in enumerate(fleet.agents):
            model.load(glob_t)
            model.train(a.train_x, a.train_y, args.local_epochs, args.fullft_lr, seed * 1000 + 100 * r + i)
            for k, v in model.state().items():
                acc[k] += v * (n[i] / n.sum())
        glob_t = {k: v.astype(np.float32) for k, v in acc.items()}
        model.load(glob_t)
        for a in fleet.agents:
            o, al = _score(model, a)
            own[a.name].append(o)
            alls[a.name].append(al)
        glob.append(model.accuracy(fleet.global_x, fleet.global_y))
        print(f"    full-ft-fedavg r{r}: global {glob[-1]:.3f}", flush=True)
    return {"method": "full-ft-fedavg", "own": own, "all": alls, "global_": glob,
            "exchanged_floats": int(sum(v.size for v in glob_t.values()))}  # fmt: skip


def run_zero_shot(fleet: Fleet, args, seed: int, models: dict) -> dict:
    model = models.setdefault(
        ("lora", "ce-lora", args.rank), Model(args.pretrained, CLASSES, "lora", "ce-lora", args.rank, seed)
    )
    model.load(model.init)
    own = {a.name: [_score(model, a)[0]] for a in fleet.agents}
    alls = {a.name: [_score(model, a)[1]] for a in fleet.agents}
    cold = {a.name: {"on_join": _score(model, a)} for a in fleet.newcomers}
    return {"method": "zero-shot", "own": own, "all": alls,
            "global_": [model.accuracy(fleet.global_x, fleet.global_y)], "cold_start": cold}  # fmt: skip


CLASSES: tuple[str, ...] = ()


def main() -> None:
    global CLASSES
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regime", choices=("today", "scarce", "clustered"), default="today")
    ap.add_argument("--agents", type=int, default=10)
    ap.add_argument("--per-agent", type=int, default=300)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--fullft-lr", type=float, default=1e-4)
    ap.add_argument("--lam", type=float, default=0.5)
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--fleet-weight", type=float, default=0.5, help="fleet-core's g")
    ap.add_argument("--lora-fleet-weight", type=float, default=None, help="fleet-lora's g (default: its own)")
    ap.add_argument("--core-lr-scale", type=float, default=4.0, help="lr multiplier of the C-only methods")
    ap.add_argument("--newcomers", type=int, default=0, help="cold-start agents (clustered regime)")
    ap.add_argument("--no-shift", action="store_true", help="no camera shifts (FLoRA's protocol)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--methods", nargs="+", default=["zero-shot", *METHODS])
    ap.add_argument("--pretrained", default=None, help="base weights (default: the cached pretrained base)")
    ap.add_argument("--base-cache", type=Path, default=Path("/tmp/fedclip-fmnist-base"))
    ap.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from fmnist_base import split_fmnist

    from fedclip.exporters.models import build_base_model
    from fedclip.sdk.preprocess import ImageTransform

    if args.pretrained is None:
        from fmnist_base import cached_base

        print(f"base: pretrained fedclip-tiny, cached in {args.base_cache}", flush=True)
        args.pretrained = cached_base(args.base_cache)["weights"]
    _, pool = split_fmnist(5000)
    CLASSES = pool.classes
    transform = ImageTransform(build_base_model("fedclip-tiny", args.pretrained).preprocess)
    results = {}
    t0 = time.monotonic()
    for seed in args.seeds:
        fleet = make_fleet(pool, transform, args.regime, args.agents, args.per_agent, seed, args.beta,
                           newcomers=args.newcomers, cameras=not args.no_shift)  # fmt: skip
        print(f"seed {seed}: {args.regime}, {len(fleet.agents)} agents", flush=True)
        models: dict = {}
        results[seed] = {"groups": [a.group for a in fleet.agents]}
        for name in args.methods:
            t = time.monotonic()
            if name == "zero-shot":
                res = run_zero_shot(fleet, args, seed, models)
            elif name == "full-ft-fedavg":
                res = run_fullft(fleet, args, seed)
            else:
                m = METHODS[name]
                opts: tuple = ()
                if m.strategy == "fleet-core":
                    opts = (("fleet_weight", args.fleet_weight),)
                elif m.strategy == "fleet-lora" and args.lora_fleet_weight is not None:
                    opts = (("fleet_weight", args.lora_fleet_weight),)
                scale = args.core_lr_scale if m.init == "frozen-seed" else m.lr_scale
                m = Method(m.kind, m.init, m.strategy, scale, opts, m.rank)
                res = run_method(name, m, fleet, args, seed, models)
            res["seconds"] = time.monotonic() - t
            results[seed][name] = res
            own = np.mean([v[-1] for v in res["own"].values()])
            alls = np.mean([v[-1] for v in res["all"].values()])
            print(f"  {name}: own {own:.3f} all {alls:.3f} ({res['seconds']:.0f}s)", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            doc = {"protocol": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "command": "python benchmarks/fmnist_sim.py " + " ".join(sys.argv[1:]),
                   "results": results, "seconds": time.monotonic() - t0}  # fmt: skip
            args.out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
