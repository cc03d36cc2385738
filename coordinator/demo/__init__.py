"""`fedclip-coord demo`: the whole job on one machine, with real processes and real MQTT.

Broker (embedded amqtt unless `--broker`), bundle export, non-IID partition of a real data set, the
coordinator and N `fedclip-agent start` processes; then an evaluation of every agent on its own
held-out test split after every round, and a report folder (JSON, Markdown table, PNG plot).

The package only orchestrates: every step is one of the public commands run as a child process
(`fedclip.coordinator.procs`), so the demo does exactly what a user's fleet would do, and the
benchmarks reuse `run_federation` to drive the same path. Rooms: `config`, `launch` (broker, data,
bundle), `federation`, `evaluation`, `report`, `command`. This front door names what the CLI, the
benchmarks and the tests use.
"""

from fedclip.coordinator.demo.command import demo, run_demo
from fedclip.coordinator.demo.config import DemoConfig, agent_cli, coord_cli, flags
from fedclip.coordinator.demo.evaluation import accuracy_per_round, finish_eval, spawn_eval
from fedclip.coordinator.demo.federation import (
    FleetRun,
    deliver_final,
    round_adapters,
    round_costs,
    round_records,
    run_federation,
)
from fedclip.coordinator.demo.launch import (
    BrokerInfo,
    auth_flags,
    broker_for,
    check_bundle,
    export,
    partition,
    read_partition,
    resolve_dataset,
)
from fedclip.coordinator.demo.report import build_report, plot_accuracy, report_tables, write_markdown

__all__ = [
    "BrokerInfo", "DemoConfig", "FleetRun", "accuracy_per_round", "agent_cli", "auth_flags",
    "broker_for", "build_report", "check_bundle", "coord_cli", "demo", "deliver_final", "export",
    "finish_eval", "flags", "partition", "plot_accuracy", "read_partition", "round_adapters", "report_tables",
    "resolve_dataset", "round_costs", "round_records", "run_demo", "run_federation", "spawn_eval",
    "write_markdown",
]  # fmt: skip
