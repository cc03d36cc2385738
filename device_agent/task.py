"""A round's task as the agent accepts it: parsed from the wire and checked against this agent and
its bundle before any work starts, so a bad task is refused with one line and never half-runs."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fedclip.sdk.adapters import check_adapter
from fedclip.sdk.errors import WireError
from fedclip.sdk.ids import ID_PATTERN
from fedclip.sdk.label_prior import unsupported
from fedclip.sdk.manifest import Manifest
from fedclip.sdk.messages import Task
from fedclip.sdk.wire import Message


class WrongBundle(WireError):
    """A task or adapter for another bundle: refused, and the coordinator is told why."""


def parse_task(msg: Message, manifest: Manifest, agent_id: str, where: str) -> Task:
    """Validate a decoded task against this agent and its bundle; WireError/AdapterError say why not.
    Every field's type and bound is `sdk.messages.Task`'s; what is checked here is that the task is
    this agent's and fits this bundle."""
    if msg.envelope.agent != agent_id:
        raise WireError(f"{where}: task is for agent {msg.envelope.agent!r}, this is {agent_id!r}")
    task = Task.parse(msg, where)
    if task.bundle_id != manifest.bundle_id:
        raise WrongBundle(
            f"task is for bundle {task.bundle_id[:12]}, this agent runs bundle {manifest.bundle_id[:12]}"
        )
    why = unsupported(task.hyperparameters.loss, manifest, "this agent's bundle")
    if why:
        raise WireError(f"{where}: the task's loss {why}")
    adapter = check_adapter(task.adapter, manifest, where) if task.adapter else {}
    return replace(task, adapter=adapter)


def parse_adapter(
    msg: Message, manifest: Manifest, agent_id: str, where: str
) -> tuple[str, dict[str, np.ndarray]]:
    """Validate an unsigned adapter push (agents without a coordinator key): (version, tensors)."""
    env = msg.envelope
    if env.agent != agent_id:
        raise WireError(f"{where}: adapter is for agent {env.agent!r}")
    bundle_id = env.body.get("bundle_id")
    if bundle_id != manifest.bundle_id:
        raise WrongBundle(
            f"adapter is for bundle {str(bundle_id)[:12]}, this agent runs bundle {manifest.bundle_id[:12]}"
        )
    version = env.body.get("version") or env.base_version
    if not isinstance(version, str) or not ID_PATTERN.match(version):
        raise WireError(f"{where}: adapter version {version!r} is not a valid id")
    return version, check_adapter(msg.adapter_tensors, manifest, where)
