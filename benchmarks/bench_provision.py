"""Provisioning costs: making kits, rewriting the broker files, the registry lookups the coordinator
will make per message, and a CONNECT against the generated mosquitto login vs an anonymous one.

1. `provision add` of N devices in a batch (kits as tarballs, broker files written once at the end),
   per kit; then one rewrite of the mosquitto and amqtt files at N enrolled devices.
2. `Enrolment.public_key(id)` (one SQLite query) against a dict lookup of the same keys, in the same run.
3. CONNECT + CONNACK + DISCONNECT of a device login on mosquitto running the generated config, against
   the same on an anonymous mosquitto (the baseline), both started in this run.

    python benchmarks/bench_provision.py [--devices 300] [--out benchmarks/results/provision]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import loadavg, machine, md_table, ratio, utc_now, write_json  # noqa: E402

from fedclip.coordinator.provision import KIT_PASSWORD, Provisioner  # noqa: E402
from fedclip.sdk.broker_mosquitto import MosquittoBroker  # noqa: E402
from fedclip.sdk.broker_ports import free_port  # noqa: E402
from fedclip.sdk.mqtt import MqttSession  # noqa: E402


def _timed(fn, n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t0)
    return out


def _connect_times(url: str, n: int, **login) -> list[float]:
    def once(i: int) -> None:
        MqttSession(url, login.get("username") or f"anon{i}", clean_session=True, **login).connect(15).close()

    once(0)  # warm-up: the first connection pays imports and the broker's first accept
    return _timed(once, n)


def run(devices: int, connects: int, work: Path) -> dict:
    prov = Provisioner.init(work / "state", "bench")
    out = work / "broker"
    port = free_port()
    prov.write_broker("mosquitto", out, port=port)
    prov.write_broker("amqtt", work / "amqtt", port=free_port())

    ids = [f"dev-{i:05d}" for i in range(devices)]
    adds = _timed(
        lambda i: prov.add(ids[i], tar=work / "kits" / f"{ids[i]}.tar.gz", rewrite_brokers=False), devices
    )
    t0 = time.perf_counter()
    prov.write_brokers()
    rewrite = time.perf_counter() - t0

    reg = prov.registry
    keys = {a: reg.public_key(a) for a in ids}
    probe = [random.Random(i).choice(ids) for i in range(5000)]
    t0 = time.perf_counter()
    for a in probe:
        reg.public_key(a)
    lookup = (time.perf_counter() - t0) / len(probe)
    t0 = time.perf_counter()
    for a in probe:
        keys.get(a)
    dict_lookup = (time.perf_counter() - t0) / len(probe)

    secured = MosquittoBroker(port=port, include_dir=out / "conf.d")
    plain = MosquittoBroker()
    try:
        secured.start()
        plain.start()
        kit = work / "kits" / "dev-00000"
        with tarfile.open(work / "kits" / "dev-00000.tar.gz") as tf:
            tf.extractall(work / "kits", filter="data")
        pw = (kit / KIT_PASSWORD).read_text().strip()
        anon = _connect_times(plain.url, connects)
        login = _connect_times(secured.url, connects, username="dev-00000", password=pw)
    finally:
        secured.cleanup()
        plain.cleanup()

    med = statistics.median
    return {
        "devices": devices,
        "add_s_median": med(adds),
        "add_s_max": max(adds),
        "broker_rewrite_s": rewrite,
        "public_key_us": lookup * 1e6,
        "dict_lookup_us": dict_lookup * 1e6,
        "public_key_vs_dict": ratio(lookup, dict_lookup),
        "connect_anonymous_ms_median": med(anon) * 1e3,
        "connect_login_ms_median": med(login) * 1e3,
        "connect_login_vs_anonymous": ratio(med(login), med(anon)),
        "connects": connects,
    }


def report(r: dict, path: Path) -> None:
    rows = [
        [
            "provision add (tarball kit, per device)",
            f"{r['add_s_median'] * 1e3:.1f} ms",
            f"max {r['add_s_max'] * 1e3:.0f} ms",
            "",
        ],
        [
            f"rewrite mosquitto + amqtt files at {r['devices']} devices",
            f"{r['broker_rewrite_s'] * 1e3:.0f} ms",
            "",
            "",
        ],
        [
            "Enrolment.public_key(id)",
            f"{r['public_key_us']:.1f} us",
            f"dict {r['dict_lookup_us']:.2f} us",
            f"{r['public_key_vs_dict']:.0f}x",
        ],
        [
            "CONNECT with a device login (generated config)",
            f"{r['connect_login_ms_median']:.2f} ms",
            f"anonymous {r['connect_anonymous_ms_median']:.2f} ms",
            f"{r['connect_login_vs_anonymous']:.2f}x",
        ],
    ]
    text = (
        "# Provisioning costs\n\n"
        f"{utc_now()}, {r['machine']['nproc']} cores ({r['machine']['cpu_model']}), load {r['load']} "
        "(a machine shared with other jobs: absolute times are upper bounds).\n\n"
        + md_table(["what", "time", "baseline (same run)", "ratio"], rows)
        + "\n\n"
        f"{r['devices']} devices provisioned in one batch; {r['connects']} connections each way. "
        "The device login's hash is mosquitto's own `$7$` PBKDF2-SHA512 at 101 rounds (its default), "
        "so a CONNECT costs about what an anonymous one does. `public_key` is one SQLite query, so a "
        "revoke made by another process is seen on the next message; at these microseconds per "
        "message a cache is not needed.\n\n"
        "Reproduce: `python benchmarks/bench_provision.py`.\n"
    )
    path.with_suffix(".md").write_text(text)
    write_json(path.with_suffix(".json"), r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=300)
    ap.add_argument("--connects", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "provision")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedclip-bench-provision-") as tmp:
        r = run(args.devices, args.connects, Path(tmp))
    r.update(machine=machine(), load=loadavg(), when=utc_now())
    report(r, args.out)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
