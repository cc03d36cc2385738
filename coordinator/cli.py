"""`fedclip-coord`: one typer app; each command group lives in its own module.

Command modules import heavy dependencies (torch, open_clip) inside their functions only, so
`fedclip-coord --help` and every non-export command start without torch.
"""

from __future__ import annotations

from fedclip.sdk.cli import make_app, run

app = make_app(
    "fedclip coordinator: export bundles, run federated rounds, manage adapters and rollouts.",
    commands=[
        ("fedclip.coordinator.export_cmd", "export", "export"),
        ("fedclip.coordinator.serve_cmd", "serve", "serve"),
        ("fedclip.coordinator.serve_cmd", "status", "status"),
        ("fedclip.coordinator.ops_cmd", "dashboard", "dashboard"),
        ("fedclip.coordinator.partition_cmd", "partition", "partition"),
        ("fedclip.coordinator.demo", "demo", "demo"),
    ],
    groups=[
        ("fedclip.coordinator.adapters_cmd", "app", "adapters"),
        ("fedclip.coordinator.rollout_cmd", "app", "rollout"),
        ("fedclip.coordinator.provision_cmd", "app", "provision"),
    ],
)


def main() -> None:
    run(app, "fedclip-coord")


if __name__ == "__main__":
    main()
