"""The agent's retained status message: what it says about itself (bundle, adapter in use, last
round, software versions, device, groups, why the last task was refused) and keeping it on the broker.

The status is retained, so the coordinator sees the latest one whenever it looks; the broker's last
will (built from `status_blob(..., "offline")` before connecting) covers an agent that dies.
"""

from __future__ import annotations

import logging
import platform
from importlib import metadata

from fedclip.device_agent.config import AgentConfig
from fedclip.device_agent.ort_loader import device_providers
from fedclip.device_agent.state import AgentState
from fedclip.sdk import messages
from fedclip.sdk.errors import BackendError, MqttError
from fedclip.sdk.messages import MAX_TEXT, AgentStatus
from fedclip.sdk.transport import Transport
from fedclip.sdk.wire import Topics

log = logging.getLogger("fedclip.agent")

_DISTRIBUTIONS = (
    "fedclip",
    "onnxruntime-training",
    "onnxruntime-training-cpu",
    "onnxruntime",
    "onnxruntime-gpu",
)


def software_versions() -> dict[str, str]:
    """Python and the installed fedclip / onnxruntime distributions, as the status reports them."""
    out = {"python": platform.python_version()}
    for dist in _DISTRIBUTIONS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def status_blob(
    cfg: AgentConfig, bundle_id: str, state: AgentState, num_samples: int, word: str, notice: str = ""
) -> bytes:
    """The encoded status message (signed with the device key when the agent has one); `word` is
    `online` or `offline`."""
    status = AgentStatus(
        state=word,
        bundle_id=bundle_id,
        adapter_version=state.current_adapter or "",
        last_round=state.last_round,
        versions=software_versions(),
        device={
            "kind": _device_kind(cfg.device),
            "machine": platform.machine(),
            "system": platform.system(),
            "release": platform.release(),
            "threads": cfg.threads,
        },
        groups=tuple(cfg.groups),
        num_samples=num_samples,
        notice=notice[:MAX_TEXT],
    )
    return messages.encode(status, cfg.fleet, cfg.id, key=cfg.signing_key())


def _device_kind(device: str) -> str:
    """`cpu` or `cuda`, what `auto` resolves to here; the configured word if it cannot run (the
    trainer reports why)."""
    try:
        return device_providers(device)[0]
    except BackendError:
        return device


class StatusReporter:
    """Keeps the agent's retained status current. `notice` (why the last task was refused, or a state
    dir error) goes out with the next status."""

    def __init__(
        self, transport: Transport, cfg: AgentConfig, bundle_id: str, state: AgentState, num_samples: int
    ) -> None:
        self.transport = transport
        self.cfg = cfg
        self.topic = Topics(cfg.fleet).status(cfg.id)
        self.bundle_id = bundle_id
        self.state = state
        self.num_samples = num_samples
        self.notice = ""
        self._online = b""
        self.refresh()

    def blob(self, word: str) -> bytes:
        return status_blob(self.cfg, self.bundle_id, self.state, self.num_samples, word, self.notice)

    def refresh(self) -> None:
        # The hook thread reads this one bytes object; it never touches the state record itself.
        self._online = self.blob("online")

    def publish(self) -> None:
        """Publish the current `online` status (after a round, an install, a refusal)."""
        self.refresh()
        try:
            self.transport.publish(self.topic, self._online, qos=1, retain=True, timeout=10)
        except MqttError as e:
            log.warning("status not acknowledged (%s); it goes out again on reconnect", e)

    def refuse(self, why: str) -> None:
        """A task refused: say why in the log and in the status, so the coordinator learns it."""
        log.warning("refused: %s", why)
        self.notice = f"refused: {why}"
        self.publish()

    def on_connect(self, transport: Transport) -> None:
        """Runs on the transport's hook thread after every (re)connect."""
        try:
            transport.publish(self.topic, self._online, qos=1, retain=True, timeout=10)
        except MqttError as e:
            log.warning("online status not acknowledged (%s)", e)

    def publish_offline(self) -> None:
        """On a clean stop; the broker's last will covers the unclean ones."""
        try:
            if self.transport.connected.is_set():
                self.transport.publish(self.topic, self.blob("offline"), qos=1, retain=True, timeout=5)
                log.info("offline status published")
        except MqttError as e:
            log.warning("offline status not acknowledged (%s); the broker's last will covers it", e)
