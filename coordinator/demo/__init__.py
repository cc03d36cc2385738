"""`fedclip-coord demo`: the whole job on one machine, with real processes and real MQTT.

Broker (embedded amqtt unless `--broker`), bundle export, non-IID partition of a real data set, the
coordinator and N `fedclip-agent start` processes; then every agent's accuracy on its own held-out
test split and on an all-class set, before and after, beside what local-only training would have
given, and a report folder (JSON, Markdown table, PNG plot).

The package only orchestrates: every step is one of the public commands run as a child process
(`fedclip.coordinator.procs`), so the demo does exactly what a user's fleet would do, and the
benchmarks reuse `run_federation` to drive the same path. Rooms: `config`, `base` (the pretrained
model it starts from), `launch` (broker, data, bundle), `federation`, `evaluation` (child jobs two at a
time), `comparison` (zero-shot / local-only / federated / gated, own and all-class), `report`, `plot`,
`command`. This front door names what the CLI, the
benchmarks and the tests use.
"""

from fedclip.coordinator.demo.base import Base, choose_base, client_dataset
from fedclip.coordinator.demo.command import demo, run_demo
from fedclip.coordinator.demo.comparison import (
    COLUMNS,
    SETS,
    Comparison,
    columns,
    compare,
    final_adapter,
    final_fallback,
)
from fedclip.coordinator.demo.config import (
    DEFAULT_STRATEGY,
    STRATEGY_BUNDLE,
    DemoConfig,
    agent_cli,
    coord_cli,
    flags,
)
from fedclip.coordinator.demo.evaluation import (
    Job,
    accuracy_per_round,
    finish_eval,
    run_jobs,
    spawn_eval,
)
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
    write_all_class,
)
from fedclip.coordinator.demo.plot import plot_accuracy
from fedclip.coordinator.demo.report import build_report, report_tables, write_markdown

__all__ = [
    "COLUMNS", "DEFAULT_STRATEGY", "SETS", "STRATEGY_BUNDLE", "Base", "BrokerInfo", "Comparison",
    "DemoConfig", "FleetRun", "Job", "accuracy_per_round", "agent_cli", "auth_flags", "broker_for",
    "build_report", "check_bundle", "choose_base", "client_dataset", "columns", "compare", "coord_cli",
    "demo", "deliver_final", "export", "final_adapter", "final_fallback", "finish_eval", "flags", "partition",
    "plot_accuracy", "read_partition", "report_tables", "resolve_dataset", "round_adapters",
    "round_costs", "round_records", "run_demo", "run_federation", "run_jobs", "spawn_eval",
    "write_all_class", "write_markdown",
]  # fmt: skip
