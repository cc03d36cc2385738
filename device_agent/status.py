"""The agent's retained status message: what it says about itself (bundle, adapter in use and the
fleet's adapter beside it, last round, software versions, device, groups, why the last task was
refused) and keeping it on the broker.

The status is retained, so the coordinator sees the latest one whenever it looks; the broker's last
will (built from `status_blob(..., "offline")` before connecting) covers an agent that dies.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
from importlib import metadata

from fedclip.device_agent.config import AgentConfig
from fedclip.device_agent.ort_loader import device_providers
from fedclip.device_agent.state import AgentState
from fedclip.sdk import messages
from fedclip.sdk.errors import BackendError, MqttError
from fedclip.sdk.messages import (
    AGENT_FEATURES,
    DEVICE_FALLBACK,
    FEATURES_KEY,
    MAX_TEXT,
    AgentStatus,
    TuningProgress,
)
from fedclip.sdk.transport import Transport
from fedclip.sdk.wire import Topics

log = logging.getLogger("fedclip.agent")

FIRST_RESEND = 5.0  # seconds after a connect until the status goes out again (then doubling)

_DISTRIBUTIONS = (
    "fedclip",
    "onnxruntime-training",
    "onnxruntime-training-cpu",
    "onnxruntime",
    "onnxruntime-gpu",
)


def software_versions() -> dict[str, str]:
    """Python and the installed fedclip / onnxruntime distributions, as the status reports them, and
    the wire features this agent takes (`sdk.messages.FEATURES_KEY`: what a coordinator checks
    before it sends one)."""
    out = {"python": platform.python_version(), FEATURES_KEY: ",".join(AGENT_FEATURES)}
    for dist in _DISTRIBUTIONS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def status_blob(
    cfg: AgentConfig,
    bundle_id: str,
    state: AgentState,
    num_samples: int,
    word: str,
    notice: str = "",
    tuning: TuningProgress | None = None,
) -> bytes:
    """The encoded status message (signed with the device key when the agent has one); `word` is
    `online` or `offline`; `tuning`: a personal tuning not finished yet."""
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
            # the fleet's adapter its open-set gate uses, when it keeps one (sdk.messages.DEVICE_FALLBACK)
            **({DEVICE_FALLBACK: fallback} if (fallback := state.fallback_version()) else {}),
        },
        groups=tuple(cfg.groups),
        num_samples=num_samples,
        notice=notice[:MAX_TEXT],
        personal=state.personal_metrics(),
        # only the adapter in use's: an install or rollback ends what a tuning of another meant
        tuning=tuning if tuning is not None and tuning.adapter == state.current_adapter else None,
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
        self.tuning: TuningProgress | None = None  # the agent's personal tuning, while unfinished
        self._online = b""
        # When the status went out last (monotonic; the hook thread writes it too: a float, one
        # store) and the wait until it goes out again (doubles up to cfg.status_interval).
        self._sent_at = time.monotonic()
        self._gap = FIRST_RESEND
        self._tasked = False  # a task reached us since the last connect: the coordinator knows us
        # Held from reading the status to its acknowledgement, by the main thread and the hook
        # thread alike: a reconnect's hook that read the status a moment before the main thread
        # published a newer one would otherwise hand the broker the older one after it.
        self._saying = threading.Lock()
        self.refresh()

    def blob(self, word: str) -> bytes:
        return status_blob(
            self.cfg, self.bundle_id, self.state, self.num_samples, word, self.notice, self.tuning
        )

    def refresh(self) -> None:
        # The hook thread reads this one bytes object; it never touches the state record itself.
        self._online = self.blob("online")

    def publish(self) -> None:
        """Publish the current `online` status (after a round, an install, a refusal)."""
        with self._saying:
            self.refresh()
            self._sent_at = time.monotonic()
            try:
                self.transport.publish(self.topic, self._online, qos=1, retain=True, timeout=10)
            except MqttError as e:
                log.warning("status not acknowledged (%s); it goes out again on reconnect", e)

    def quiet_for(self, now: float | None = None) -> float:
        """Seconds since the status last went out (any publish, resend or connect's)."""
        return (time.monotonic() if now is None else now) - self._sent_at

    def tasked(self) -> None:
        """A task arrived: the coordinator knows this agent, so resends stop until the next connect."""
        self._tasked = True

    def tick(self, now: float | None = None) -> bool:
        """Republish the status when it is due (main thread, between messages); True when it went.

        A retained status is the coordinator's only sign that an agent exists: a broker that lost
        it (the embedded amqtt broker can, under many connects at once) or a coordinator that
        missed it would leave the agent unseen until its next change. Resending 5, 10, 20, ... s
        after a connect, until a task arrives, heals that within seconds; `status_interval` bounds
        the load of agents never selected (10,000 at 300 s: 33 statuses per second). Resends stop
        at the first task so that an agent that leaves tasks unanswered does not keep undoing the
        coordinator's `max_missed` rest by speaking."""
        interval = self.cfg.status_interval
        now = time.monotonic() if now is None else now
        if not interval or self._tasked or self.quiet_for(now) < min(self._gap, interval):
            return False
        if not self.transport.connected.is_set():
            return False
        self._gap = min(2 * self._gap, interval)
        with self._saying:
            self._sent_at = now
            self.refresh()  # a fresh `sent_at`: the coordinator's max_status_age counts from it
            try:
                self.transport.publish(self.topic, self._online, qos=1, retain=True, timeout=5)
            except MqttError as e:
                log.debug("status resend not acknowledged (%s)", e)
        return True

    def refuse(self, why: str) -> None:
        """A task refused: say why in the log and in the status, so the coordinator learns it."""
        log.warning("refused: %s", why)
        self.notice = f"refused: {why}"
        self.publish()

    def on_connect(self, transport: Transport) -> None:
        """Runs on the transport's hook thread after every (re)connect."""
        with self._saying:
            self._sent_at, self._gap, self._tasked = time.monotonic(), FIRST_RESEND, False
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
