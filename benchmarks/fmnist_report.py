"""Turn `fmnist_fl.json` into `fmnist_fl.md` and plots: per-method summaries, spread over seeds, targets."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

# the coordinator's default loss since session 17 (balanced softmax), beside plain CE's rows
BSM_ROWS = ("fedavg-lora-both-bsm", "ce-lora-bsm")
ORDER = (
    "zero-shot", "local-lora", "fedavg-lora-text", "fedavg-lora-both", "ce-lora", "full-ft-fedavg", *BSM_ROWS
)  # fmt: skip


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def _sd(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None]
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _per_value(x, n: int) -> list:
    return x if isinstance(x, list) else [x] * n


def summarize(res: dict) -> dict:
    """One method on one seed: final mean/worst accuracy, mean curve, bytes, seconds, RSS."""
    acc = res["accuracy_per_round"]
    final = [v[-1] for v in acc.values()]
    curve = [_mean(list(col)) for col in zip(*acc.values(), strict=True)]
    rounds = len(res.get("round_seconds") or [])
    up = _per_value(res.get("uplink_bytes_per_round") or [], rounds)
    down = _per_value(res.get("downlink_bytes_per_round") or [], rounds)
    per_round = [(u or 0) + (d or 0) for u, d in zip(up, down, strict=False)]
    return {
        "mean": _mean(final),
        "worst": min(final),
        "curve": curve,
        "bytes_per_round": _mean(per_round) if per_round else None,
        "bytes_total": sum(per_round),
        "seconds_per_round": _mean(res.get("round_seconds") or []),
        "round_seconds": res.get("round_seconds") or [],
        "peak_rss": res.get("peak_agent_rss_bytes") or res.get("peak_rss_bytes"),
        # adapter (or weight) tensors only, down and up for every agent: what the method must move
        "payload_per_round": 2 * res["exchanged_tensor_bytes"] * res["agents_per_round"]
        if res.get("exchanged_tensor_bytes")
        else None,
        "final_missing": res.get("final_missing") or [],
    }


def time_to_target(s: dict, target: float) -> float | None:
    """Cumulative round seconds until the mean accuracy first reaches `target` (0 if it starts there)."""
    if s["curve"] and s["curve"][0] is not None and s["curve"][0] >= target:
        return 0.0
    elapsed = 0.0
    for r, secs in enumerate(s["round_seconds"], start=1):
        elapsed += secs or 0.0
        if r < len(s["curve"]) and s["curve"][r] is not None and s["curve"][r] >= target:
            return elapsed
    return None


# the methods the time-to-target accuracy is set from (the -bsm rows, added in session 17, are timed
# against it but do not move it, so the earlier rows' times stay comparable)
FEDERATED = ("fedavg-lora-text", "fedavg-lora-both", "ce-lora", "full-ft-fedavg")
TARGET_RULE = "halfway from zero-shot to the best final mean accuracy of the federated methods"


def default_target(sums: dict[str, dict]) -> float | None:
    """Halfway from zero-shot to the best federated final accuracy (None if nothing beats zero-shot)."""
    zs = sums.get("zero-shot", {}).get("mean")
    ends = [sums[m]["mean"] for m in FEDERATED if m in sums]
    if zs is None or not ends or max(ends) <= zs:
        return None
    return zs + 0.5 * (max(ends) - zs)


GLOBAL_TARGET_RULE = (
    "halfway from zero-shot to the lower final mean accuracy of FedAvg-LoRA (both towers) and full-FT "
    "FedAvg: an accuracy both global-model methods reach, so their times compare"
)


def global_target(sums: dict[str, dict]) -> float | None:
    zs = sums.get("zero-shot", {}).get("mean")
    ends = [sums[m]["mean"] for m in ("fedavg-lora-both", "full-ft-fedavg") if m in sums]
    if zs is None or len(ends) < 2 or min(ends) <= zs:
        return None
    return zs + 0.5 * (min(ends) - zs)


def _fmt_b(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "-"


def _pm(xs: list[float | None], scale: float = 100.0, digits: int = 1) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    m = sum(xs) / len(xs) * scale
    return f"{m:.{digits}f} ± {_sd(xs) * scale:.{digits}f}" if len(xs) > 1 else f"{m:.{digits}f}"


def write_report(out: Path, doc: dict) -> None:
    proto = doc["protocol"]
    seeds = sorted(doc["results"], key=int)
    methods = [m for m in ORDER if any(m in doc["results"][s] for s in seeds)]
    sums = {s: {m: summarize(doc["results"][s][m]) for m in methods if m in doc["results"][s]} for s in seeds}
    targets = {s: proto.get("target") or default_target(sums[s]) for s in seeds}
    gtargets = {s: global_target(sums[s]) for s in seeds}
    table = {}
    for m in methods:
        per = [sums[s][m] for s in seeds if m in sums[s]]
        ttt = [time_to_target(sums[s][m], targets[s]) if targets[s] is not None else None
               for s in seeds if m in sums[s]]  # fmt: skip
        table[m] = {
            "mean": [p["mean"] for p in per],
            "worst": [p["worst"] for p in per],
            "bytes_per_round": _mean([p["bytes_per_round"] for p in per]),
            "bytes_total": _mean([p["bytes_total"] for p in per]) if m in (*FEDERATED, *BSM_ROWS) else None,
            "seconds_per_round": [p["seconds_per_round"] for p in per],
            "time_to_target": ttt,
            "time_to_global_target": [
                time_to_target(sums[s][m], gtargets[s]) if gtargets[s] is not None else None
                for s in seeds
                if m in sums[s]
            ],
            "peak_rss": _mean([p["peak_rss"] for p in per if p["peak_rss"]]),
            "payload_per_round": _mean([p["payload_per_round"] for p in per if p["payload_per_round"]]),
        }
    lines = [
        "# FMNIST-FL: federated LoRA vs. baselines on non-IID Fashion-MNIST clients",
        "",
        "Produced by `python benchmarks/fmnist_fl.py` "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in _cli_args(proto).items())
        + f"; machine: {doc['machine']['cpus']} CPUs, {doc['machine']['platform']}.",
        "",
    ]
    if proto.get("note"):
        lines += [f"**Scale:** {proto['note']}", ""]
    base = doc.get("base")
    if base:
        lines += [
            "## Base model (made here, honestly)",
            "",
            f"No pretrained CLIP weights can be downloaded where this ran, so `{base['model']}` (random "
            "init) was "
            f"pretrained contrastively on {base['public_images']} public images (the first images of the "
            "official "
            f'Fashion-MNIST *train* set, captions "{base["prompt"]}") for {base["steps"]} steps of batch '
            f"{base['batch_size']} ({base['seconds']:.0f} s). Zero-shot accuracy on the client pool (the "
            "official "
            f"*test* set, before any camera shift): {100 * base['zero_shot_pool_accuracy']:.1f}% "
            f"(random init: {100 * base['zero_shot_pool_accuracy_random_init']:.1f}%). The clients' images "
            "come "
            "only from the test set, so no client image was seen in pretraining. With real open_clip "
            "weights, run "
            "`fmnist_fl.py --model NAME --pretrained FILE|TAG` and the same protocol runs on them.",
            "",
        ]
    lines += [
        "## Protocol",
        "",
        f"{proto['agents']} agents, label skew Dirichlet(beta = {proto['beta']}), at most "
        f"{proto['per_agent']} "
        f"images each (80% train, 20% own test split), a per-agent camera shift (`fedclip.sdk.partition`). "
        f"Every method starts from the same base and gets the same budget: {proto['rounds']} rounds x "
        f"{proto['local_epochs']} local epoch(s), batch {proto['batch_size']}; local-only LoRA trains "
        f"{proto['rounds'] * proto['local_epochs']} epochs alone. LoRA rank {proto['rank']} on q,v, lr "
        f"{proto['lr']}; full fine-tuning lr {proto['fullft_lr']} (AdamW, every weight). Agents train on "
        "80% of "
        "their train folder (the rest is their own held-out metric split, as `fedclip-agent start` does); "
        "accuracy is measured on each agent's test split. Federated LoRA methods ran through the real "
        "coordinator, agent processes and embedded MQTT broker; after the last round the coordinator rolls "
        "each "
        "agent its adapter (its own personalized one with CE-LoRA). Full FT FedAvg ran in one PyTorch "
        "process.",
        "",
        f"Seeds: {', '.join(seeds)} (partition, adapter init and shuffling change with the seed; the base "
        "model "
        "does not). Numbers are mean ± standard deviation over seeds.",
        "",
        "## Results",
        "",
        "| method | mean acc (%) | worst agent (%) | bytes / round (up+down) | of which tensors "
        "| bytes total | s / round | time to target (s) | peak agent RSS |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in methods:
        t = table[m]
        ttt = [x for x in t["time_to_target"] if x is not None]
        ttt_s = "-" if m in ("zero-shot", "local-lora") else (
            _pm(ttt, 1.0) + ("" if len(ttt) == len(t["time_to_target"]) else
                             f" ({len(t['time_to_target']) - len(ttt)} seed(s) never)")
            if ttt else "not reached")  # fmt: skip
        lines.append(
            f"| {m} | {_pm(t['mean'])} | {_pm(t['worst'])} | {_fmt_b(t['bytes_per_round'])} | "
            f"{_fmt_b(t['payload_per_round'])} | "
            f"{_fmt_b(t['bytes_total'])} | {_pm(t['seconds_per_round'], 1.0)} | {ttt_s} | "
            f"{_fmt_b(t['peak_rss'])} |"
        )
    lines += [
        "",
        "Target accuracy (per seed): "
        + (", ".join(f"seed {s}: {100 * targets[s]:.1f}%" for s in seeds if targets[s] is not None) or "none")
        + (
            " (given)"
            if proto.get("target")
            else f" ({TARGET_RULE}); time to target is the sum of round times until the mean first reaches it"
        ),
        "",
        "Global-model target (per seed): "
        + (
            ", ".join(f"seed {s}: {100 * gtargets[s]:.1f}%" for s in seeds if gtargets[s] is not None)
            or "none"
        )
        + f" ({GLOBAL_TARGET_RULE}).",
        "",
        "Bytes: LoRA methods count the coordinator's task payloads (down) and update payloads as received "
        "(up: adapter tensors plus the statistics the strategy asks for; CE-LoRA's personalization "
        "needs per-class feature statistics, sent once per agent as float16 unless its data changes); "
        "full FT counts every weight down and up for every client (float32). 'Of which tensors' is the "
        "adapter (or weight) tensors alone, 2 x agents x the "
        "exchanged tensors of the manifest: with CE-LoRA only the r x r cores travel, so the ratio to LoRA's "
        "A, B is 2d/r per module (d the layer width: 32x for fedclip-tiny's d = 64 at r = 4, 384x for "
        "ViT-B's d = 768). Seconds per round: LoRA rounds from task publication to aggregation, with all "
        "agents "
        "as separate processes on the same CPUs (each also evaluates its held-out split before and after "
        "training); full FT is the sum of the clients' training in one process (no network, no evaluation). "
        "Peak RSS: the largest agent process for LoRA; the single process simulating every client for full "
        "FT.",
        "",
    ]
    lines += ["## Mean accuracy per round (mean over seeds; round 0 = the base model)", ""]
    fed = [m for m in methods if m in FEDERATED]
    n = max((len(sums[s][m]["curve"]) for s in seeds for m in fed if m in sums[s]), default=0)
    if n:
        lines += ["| method | " + " | ".join(str(r) for r in range(n)) + " |", "|---|" + "---:|" * n]
        for m in fed:
            curves = [sums[s][m]["curve"] for s in seeds if m in sums[s]]
            cells = [_mean([c[r] for c in curves if r < len(c)]) for r in range(n)]
            lines.append(
                f"| {m} | " + " | ".join("-" if c is None else f"{100 * c:.1f}" for c in cells) + " |"
            )
        lines.append("")
    lines += _targets(table, methods)
    lines += _observations(table, _ce_uplink(doc))
    md = out / "fmnist_fl.md"
    # The regimes section (fmnist_regimes_report.py) comes from other runs: keep it.
    marker = "<!-- regimes: written by fmnist_regimes_report.py -->"
    kept = marker + md.read_text().split(marker, 1)[1] if md.is_file() and marker in md.read_text() else ""
    md.write_text("\n".join(lines) + "\n" + kept)  # lines end with a blank one
    _plots(out, doc, sums, seeds, methods)


def _cli_args(proto: dict) -> dict:
    keys = ("agents", "beta", "per_agent", "rounds", "local_epochs", "lr", "fullft_lr", "rank")
    args = {k: proto[k] for k in keys}
    args["seeds"] = " ".join(str(s) for s in proto["seeds"])
    return args


def _targets(table: dict, methods: list[str]) -> list[str]:
    def m(name: str, key: str = "mean") -> float | None:
        return _mean(table[name][key]) if name in table else None

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.0f}x" if a and b else "-"

    lines = ["## Targets from the issue, checked", "", "| target | measured | met |", "|---|---|---|"]
    ce, fa, lo, ft = m("ce-lora"), m("fedavg-lora-both"), m("local-lora"), m("full-ft-fedavg")
    bce = table.get("ce-lora", {}).get("bytes_total")
    bfa = table.get("fedavg-lora-both", {}).get("bytes_total")
    bft = table.get("full-ft-fedavg", {}).get("bytes_total")

    def row(text: str, measured: str, ok: bool | None) -> None:
        lines.append(f"| {text} | {measured} | {'-' if ok is None else 'yes' if ok else '**no**'} |")

    if ce is not None and fa is not None:
        row("CE-LoRA mean acc >= FedAvg-LoRA + 3 points", f"{100 * (ce - fa):+.1f} points", ce - fa >= 0.03)
    if ce is not None and lo is not None:
        row("CE-LoRA mean acc > local-only LoRA", f"{100 * (ce - lo):+.1f} points", ce > lo)
    if bce and bfa:
        row(
            "CE-LoRA exchanges >= 100x fewer bytes than FedAvg-LoRA (all bytes)",
            ratio(bfa, bce),
            bfa / bce >= 100,
        )
    wire = _wire_bytes_ratio()
    if wire is not None:
        model, r, rounds = wire
        row(f"... measured at {model}'s width ({rounds} rounds, `wire_bytes.md`)", f"{r:.0f}x", r >= 100)
    pce = table.get("ce-lora", {}).get("payload_per_round")
    pfa = table.get("fedavg-lora-both", {}).get("payload_per_round")
    if pce and pfa:
        row("... adapter tensors only (CE-LoRA's C vs LoRA's A, B)", ratio(pfa, pce), pfa / pce >= 100)
    if fa is not None and ft is not None:
        row(
            "FedAvg-LoRA within 2 points of full-FT FedAvg", f"{100 * (fa - ft):+.1f} points", fa >= ft - 0.02
        )
    if bfa and bft:
        row("FedAvg-LoRA exchanges >= 100x fewer bytes than full FT", ratio(bft, bfa), bft / bfa >= 100)
    for lora, key in (("fedavg-lora-both", "time_to_global_target"), ("ce-lora", "time_to_target")):
        ft_t = [x for x in table.get("full-ft-fedavg", {}).get(key, []) if x is not None]
        lt = [x for x in table.get(lora, {}).get(key, []) if x is not None]
        which = "the global-model target" if key == "time_to_global_target" else "the target"
        text = f"LoRA ({lora}) time to {which} >= 10x shorter than full FT"
        if lt and ft_t:
            a, b = _mean(lt), _mean(ft_t)
            row(text, f"{ratio(b, a)} ({a:.0f} s vs {b:.0f} s)" if a else "at target from round 0",
                (b / a >= 10) if a else None)  # fmt: skip
        elif lt:
            row(text, f"{_mean(lt):.0f} s; full FT never reached the target", True)
        elif ft_t:
            row(text, f"{lora} never reached the target; full FT in {_mean(ft_t):.0f} s", False)
        else:
            row(text, "neither reached the target", None)
    return [*lines, ""]


def _ce_uplink(doc: dict) -> tuple[float, float, float] | None:
    """CE-LoRA's mean uplink bytes per agent in round 1 (statistics travel) and in later rounds, and
    the bytes of its exchanged tensors per agent."""
    first, later, cores = [], [], []
    for res in doc["results"].values():
        r = res.get("ce-lora")
        if not r or not r.get("uplink_bytes_per_round") or not r.get("agents_per_round"):
            continue
        up = [u / r["agents_per_round"] for u in r["uplink_bytes_per_round"]]
        first.append(up[0])
        later.extend(up[1:])
        cores.append(r.get("exchanged_tensor_bytes") or 0)
    return (_mean(first), _mean(later), _mean(cores)) if first and later else None


def _wire_bytes_ratio(path: Path = Path(__file__).resolve().parent / "results" / "wire_bytes.json"):
    """(model, FedAvg-LoRA / CE-LoRA bytes over all rounds, rounds) from bench_wire_bytes.py, if run."""
    try:
        doc = json.loads(path.read_text())
        fed, ce = doc["runs"]["fedavg"]["rounds"], doc["runs"]["ce-lora"]["rounds"]
        total = lambda rs: sum(c["uplink_bytes"] + c["downlink_bytes"] for c in rs.values())  # noqa: E731
        return doc["model"], total(fed) / total(ce), len(ce)
    except (OSError, ValueError, KeyError, ZeroDivisionError):
        return None


def _observations(table: dict, ce_uplink: tuple[float, float, float] | None = None) -> list[str]:
    """What the numbers say, computed from them (so a rerun cannot leave stale prose behind)."""

    def m(name: str) -> float | None:
        return _mean(table[name]["mean"]) if name in table else None

    zs, out = m("zero-shot"), ["## Observations", ""]
    glob = [(n, m(n)) for n in ("fedavg-lora-text", "fedavg-lora-both", "full-ft-fedavg") if m(n) is not None]
    if zs is not None and glob:
        gains = ", ".join(f"{n} {100 * (v - zs):+.1f}" for n, v in glob)
        out.append(
            f"- One global model for every agent gains little over zero-shot ({gains} points): with "
            "label skew this strong most agents hold one or two classes, and a model averaged over all "
            "of them is not what any single agent's test split needs."
        )
    ce, lo = m("ce-lora"), m("local-lora")
    if ce is not None and zs is not None:
        out.append(
            f"- Personalization is what pays: CE-LoRA {100 * (ce - zs):+.1f} points over zero-shot"
            + (f", local-only LoRA {100 * (lo - zs):+.1f}" if lo is not None else "")
            + f"; the difference between them ({100 * (ce - lo):+.1f}) is within the spread over seeds."
            if lo is not None and abs(ce - lo) < 0.03
            else f"- Personalization is what pays: CE-LoRA {100 * (ce - zs):+.1f} points over zero-shot."
        )
    bsm = [(n, m(n), m(n.removesuffix("-bsm"))) for n in BSM_ROWS]
    bsm = [(n, v, ce) for n, v, ce in bsm if v is not None and ce is not None]
    if bsm and zs is not None:
        out.append(
            "- With the coordinator's default loss (balanced softmax where the bundle trains it, since "
            "session 17; each agent adds its label prior back at inference): "
            + ", ".join(
                f"{n} {100 * (v - zs):+.1f} over zero-shot ({100 * (v - ce):+.1f} vs plain CE)"
                for n, v, ce in bsm
            )  # fmt: skip
            + "."
        )
    if ce_uplink is not None:
        first, later, cores = ce_uplink
        out.append(
            f"- CE-LoRA's bytes: each agent's per-class statistics travel once, in round 1 ({_fmt_b(first)} "
            f"uplink per agent), then only when its data changes; later rounds send {_fmt_b(later)} per "
            f"agent. Of that, the r x r cores are {_fmt_b(cores)}: the rest is what every "
            "message carries (tensor names and the safetensors header, the envelope's ids, sha256, "
            "metrics and label histogram), zlib-compressed on the wire. The cores alone are 32x "
            "smaller than LoRA's A and B here "
            "(2d/r with d = 64, r = 4), which caps the ratio at this width whatever else is trimmed; "
            "`wire_bytes.md` measures the same comparison through the real coordinator at ViT-B-32's "
            "width, where it is what the target is about."
        )
    out.append(
        "- Round times of the LoRA methods include MQTT, process scheduling of 10 agents on the same "
        "CPUs and each agent's before/after evaluation; full FT's are pure training in one process, "
        "so per-round time favours full FT here, while its bytes are ~1000x larger."
    )
    return [*out, ""]


def _plots(out: Path, doc: dict, sums: dict, seeds: list[str], methods: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for m in methods:
        curves = [sums[s][m]["curve"] for s in seeds if m in sums[s]]
        n = min(len(c) for c in curves)
        mean = [_mean([c[i] for c in curves]) for i in range(n)]
        if n == 1:
            ax.axhline(mean[0], ls=":", color="gray" if m == "zero-shot" else None, label=m)
        elif m == "local-lora":
            ax.plot([0, doc["protocol"]["rounds"]], mean, "--", marker="x", label=m + " (end of training)")
        else:
            ax.plot(range(n), mean, marker="o", label=m)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("mean personalized accuracy")
    ax.set_title("FMNIST-FL: mean accuracy over agents (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "fmnist_fl.accuracy.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for m in methods:
        per = [sums[s][m] for s in seeds if m in sums[s]]
        b = _mean([p["bytes_total"] for p in per])
        a = _mean([p["mean"] for p in per])
        if b:
            ax.scatter([b], [a], s=60)
            ax.annotate(m, (b, a), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("bytes exchanged in total (log)")
    ax.set_ylabel("mean personalized accuracy")
    ax.set_title("FMNIST-FL: accuracy vs. communication")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out / "fmnist_fl.bytes.png")
    plt.close(fig)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results"
    write_report(target, json.loads((target / "fmnist_fl.json").read_text()))
