"""The fleet simulator's report: `results/scale.md` (and `scale.png`) from `results/scale.json`.

Sections: the phase table and process figures of each `fleet_sim.py` run (one column per N and
broker), the notes, `bench_intake.py`'s bursts, and before/after comparisons of two commits run
alternately on the same machine (`ab`: a list of them, each holding rows of
`fleet_sim.py --no-report`; see `ab_section`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def _column(row: dict) -> str:
    broker = row.get("broker", "mosquitto")
    return f"N = {row['agents']:,}" + ("" if broker == "mosquitto" else f" ({broker})")


def write_report(data: dict, out: Path | None = None) -> Path:
    """scale.md (or `out`) from the data of scale.json."""
    rows = data["rows"]
    lines = [
        "# A round at fleet scale: simulated agents against the real coordinator and broker",
        "",
        "Produced by `python benchmarks/fleet_sim.py` (raw numbers in `scale.json`; plot `scale.png`).",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in sorted(data["meta"].items())),
        "",
        "## Phase times (seconds; coordinator CPU seconds in brackets)",
        "",
    ]
    names = []
    for r in rows:
        for p in r.get("phases", []):
            if p["phase"] not in names:
                names.append(p["phase"])
    heads = " | ".join(_column(r) for r in rows)
    lines.append(f"| phase | {heads} |")
    lines.append("|---|" + "---:|" * len(rows))
    for name in names:
        cells = []
        for r in rows:
            p = next((p for p in r.get("phases", []) if p["phase"] == name), None)
            cells.append(f"{p['seconds']} ({p['coordinator_cpu_s']})" if p else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Processes and bytes", ""]
    keys = [
        ("signed", "provisioned fleet: updates and statuses signed, verified"),
        ("coordinator_peak_rss_mb", "coordinator peak RSS MB"),
        ("coordinator_cpu_s", "coordinator CPU s (whole run)"),
        ("broker_peak_rss_mb", "broker peak RSS MB (NATS: all nodes)"),
        ("broker_cpu_s", "broker CPU s, whole run (NATS: all nodes)"),
        ("sim_cpu_s", "simulator CPU s"),
        ("sim_peak_rss_mb", "simulator peak RSS MB"),
        ("bytes_agents_sent", "bytes agents sent (payloads)"),
        ("bytes_agents_received", "bytes agents received (payloads)"),
        ("update_bytes_mean", "mean update bytes per round"),
        ("disconnects", "disconnects"),
        ("subscriptions_refused", "subscriptions refused by the broker (retried)"),
        ("load_avg_1min_end", "1-min load average at the end"),
        ("error", "error"),
    ]
    lines.append(f"| | {heads} |")
    lines.append("|---|" + "---:|" * len(rows))
    for k, label in keys:
        if any(k in r for r in rows):
            cells = [str(r.get(k, False if k == "signed" else "-")) for r in rows]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", data.get("notes", "")]
    for ab in data.get("ab", []):  # before/after comparisons, oldest first
        lines += ab_section(ab)
    if data.get("intake"):
        lines += intake_section(data["intake"])
    out = out or RESULTS / "scale.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def intake_section(intake: dict) -> list[str]:
    """The `bench_intake.py` results as markdown: bursts (end to end) and the storage layer."""
    meta = intake.get("meta", {})
    lines = [
        "",
        "## Intake: a burst of signed updates (group commit; decode workers)",
        "",
        f"Produced by `python benchmarks/bench_intake.py` ({meta.get('date', '?')}, bundle "
        f"{meta.get('bundle', '?')}, {meta.get('cpus', '?')} cpus; the load column says how busy they "
        "were). N signed "
        "ce-lora updates (tiny tri-lora bundle, with statistics) published at once by provisioned "
        "agents; the clock runs from the burst to the N-th update stored (validated incl. signature, "
        "blob and row durable; its batch's PUBACKs follow the commit). CPU seconds per 1,000 updates "
        "are read from /proc over the same interval; the coordinator's include its decode workers "
        "(`intake_workers`; '-': the default of that commit).",
        "",
        "| intake_batch | intake_workers | updates | seconds | updates/s | coordinator CPU s / 1,000 "
        "| mosquitto CPU s / 1,000 | publisher CPU s / 1,000 | 1-min load (start, end) | rejected |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for b in intake.get("bursts", []):
        workers = "-" if b.get("intake_workers") is None else b["intake_workers"]
        if "error" in b:
            row = f"| {b['intake_batch']} | {workers} | {b['updates']} | error: {b['error']} |"
            lines.append(row + " | | | | | |")
            continue
        lines.append(
            f"| {b['intake_batch']} | {workers} | {b['updates']} | {b['seconds']} | {b['updates_per_s']} | "
            f"{b.get('coordinator_cpu_s_per_1000', '-')} | {b.get('broker_cpu_s_per_1000', '-')} | "
            f"{b.get('publisher_cpu_s_per_1000', '-')} | {b['load_avg_1min']} | {b.get('rejected', '-')} |"
        )
    st = intake.get("store")
    if st:
        lines += [
            "",
            f"Storage layer alone, this disk (ext4), batches of {st['batch']} blobs of "
            f"{st['blob_bytes']} bytes, ms per update (best of 3):",
            "",
            "| | one at a time | batch |",
            "|---|---:|---:|",
            f"| blob durable (temp file, fsync, rename, folder fsync) | {st['put_ms_per_update']} | "
            f"{st['put_many_ms_per_update']} |",
            f"| row committed (SQLite WAL, synchronous=FULL) | {st['row_each_ms_per_update']} | "
            f"{st['rows_batch_ms_per_update']} |",
        ]
    if intake.get("notes"):
        lines += ["", intake["notes"]]
    return lines


def plot(data: dict) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in data["rows"] if r.get("phases") and r.get("broker", "mosquitto") == "mosquitto"]
    if not rows:
        return None
    names = []
    for r in rows:
        names += [p["phase"] for p in r["phases"] if p["phase"] not in names]
    fig, ax = plt.subplots(figsize=(8, 5))
    ns = [r["agents"] for r in rows]
    for name in names:
        ys = [next((p["seconds"] for p in r["phases"] if p["phase"] == name), np.nan) for r in rows]
        ax.plot(ns, ys, marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("agents per round (N)")
    ax.set_ylabel("seconds")
    ax.set_title("Round phases against fleet size (2 shared cores, mosquitto, ce-lora)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    out = RESULTS / "scale.png"
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def ab_section(ab: dict) -> list[str]:
    """Before/after: the same runs of two commits, alternated in one sitting (`ab["runs"]`: each a
    `fleet_sim.py` row plus `side` "before"/"after" and `rep`); seconds (coordinator CPU s)."""
    meta = ab.get("meta", {})
    lines = ["", f"## {meta.get('title', 'Before and after')}", "", meta.get("how", ""), ""]
    for n in sorted({r["agents"] for r in ab["runs"]}):
        runs = sorted(
            (r for r in ab["runs"] if r["agents"] == n), key=lambda r: (r["side"] != "before", r["rep"])
        )
        heads = " | ".join(f"{r['side']} #{r['rep']}" for r in runs)
        lines += [f"N = {n:,}:", "", f"| phase | {heads} |", "|---|" + "---:|" * len(runs)]
        names: list[str] = []
        for r in runs:
            names += [p["phase"] for p in r["phases"] if p["phase"] not in names]
        for name in names:
            cells = []
            for r in runs:
                p = next((p for p in r["phases"] if p["phase"] == name), None)
                cells.append(f"{p['seconds']} ({p['coordinator_cpu_s']})" if p else "-")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        for key, label in (
            ("coordinator_cpu_s", "coordinator CPU s (whole run)"),
            ("load_avg_1min_end", "1-min load at the end"),
        ):
            lines.append(f"| {label} | " + " | ".join(str(r.get(key, "-")) for r in runs) + " |")
        lines.append("")
    if meta.get("notes"):
        lines.append(meta["notes"])
    return lines
