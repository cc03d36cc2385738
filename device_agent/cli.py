"""`fedclip-agent`: one typer app; commands in `local_cmd` (offline), `serve_cmd`, `fleet_cmd`.

Never imports torch (the import test checks `sys.modules`).
"""

from __future__ import annotations

from fedclip.sdk.cli import make_app, run

app = make_app(
    "fedclip device agent: train, evaluate and predict locally; join a fleet with `start`.",
    commands=[
        ("fedclip.device_agent.local_cmd", "train", "train"),
        ("fedclip.device_agent.local_cmd", "eval", "eval"),
        ("fedclip.device_agent.local_cmd", "predict", "predict"),
        ("fedclip.device_agent.serve_cmd", "serve_inference", "serve-inference"),
        ("fedclip.device_agent.fleet_cmd", "start", "start"),
        ("fedclip.device_agent.fleet_cmd", "status", "status"),
    ],
)


def main() -> None:
    run(app, "fedclip-agent")


if __name__ == "__main__":
    main()
