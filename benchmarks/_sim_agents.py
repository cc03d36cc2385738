"""The simulated agents of `fleet_sim.py`: prepared payloads and N paho clients on one selector.

`Prepared` builds, from a bundle's manifest, the status and update messages a real agent sends
(valid for `coordinator.validation`: exchanged tensors of the manifest's shapes, `stats/*` tensors
as the agent sends them, a `data_digest`), signed with the agent's kit key in a provisioned fleet
(`_sim_kits`). `SimFleet` runs N paho clients in one thread with paho's external-loop API
(`loop_read` / `loop_write` driven by the socket callbacks on a `selectors` loop), each logged in
with its kit's password when it has one.
"""

from __future__ import annotations

import hashlib
import heapq
import platform
import resource
import selectors
import time
from dataclasses import dataclass, field

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from fedclip.sdk.manifest import Manifest
from fedclip.sdk.mqtt_address import BrokerAddress
from fedclip.sdk.mqtt_subscriptions import resubscribe_delay
from fedclip.sdk.signing import Ed25519PrivateKey, sign_envelope
from fedclip.sdk.wire import (
    STAT_LABEL_HIST,
    STAT_MEAN,
    STAT_VAR,
    Envelope,
    MsgType,
    Topics,
    decode,
    encode,
    tensors_digest,
)

GROUPS = 64  # distinct update directions / data statistics in the simulated fleet
KEEPALIVE = 3600  # s: no PINGREQ traffic from 10,000 clients during a run


def agent_ids(n: int, prefix: str = "sim") -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(n)]


def raise_nofile(want: int) -> int:
    """Raise RLIMIT_NOFILE (inherited by the broker and coordinator we start) towards `want`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = min(max(soft, want), hard) if hard != resource.RLIM_INFINITY else max(soft, want)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return new


# ---- prepared payloads ----------------------------------------------------------------------------
class Prepared:
    """What every simulated agent sends, built once from the bundle's manifest; signed with the
    agent's key from `keys` (its startup kit's) when it has one."""

    def __init__(
        self, manifest: Manifest, fleet: str, seed: int = 0, keys: dict[str, Ed25519PrivateKey] | None = None
    ):
        rng = np.random.default_rng(seed)
        self.manifest, self.fleet, self.keys = manifest, fleet, keys or {}
        self.labels = max(1, len(manifest.task.labels))
        self.dim = manifest.base_model.embed_dim
        ex = manifest.exchanged
        self.deltas = [
            {t.name: (0.01 * rng.standard_normal(t.shape)).astype(np.float32) for t in ex}
            for _ in range(GROUPS)
        ]
        self.hist = [
            np.round(100 * rng.uniform(0, 1, self.labels) ** 2 + 1).astype(np.float32) for _ in range(GROUPS)
        ]
        self.mean = [
            (0.05 * rng.standard_normal((self.labels, self.dim))).astype(np.float16) for _ in range(GROUPS)
        ]
        self.var = [
            rng.uniform(0.5, 2.0, (self.labels, self.dim)).astype(np.float16) * np.float16(1e-3)
            for _ in range(GROUPS)
        ]

    def _encode(self, env: Envelope, tensors: dict[str, np.ndarray] | None = None) -> bytes:
        key = self.keys.get(env.agent)
        if key is None:
            return encode(env, tensors)
        digest = tensors_digest(tensors) if tensors else ""
        return encode(sign_envelope(key, env, digest=digest), tensors, digest=digest)

    @staticmethod
    def digest(agent: str) -> str:
        return hashlib.sha256(f"fleet-sim/{agent}".encode()).hexdigest()

    def status(self, agent: str, state: str, last_round: int = 0, adapter: str = "") -> bytes:
        body = {
            "state": state,
            "bundle_id": self.manifest.bundle_id,
            "adapter_version": adapter,
            "last_round": last_round,
            "versions": {"python": platform.python_version(), "fleet_sim": "1"},
            "device": {"kind": "sim", "machine": platform.machine(), "system": "Linux"},
            "groups": ["sim"],
            "num_samples": 100,
        }
        env = Envelope(MsgType.STATUS, self.fleet, agent, round=last_round, base_version=adapter, body=body)
        return self._encode(env)

    def update(self, agent: str, index: int, task_payload: bytes) -> tuple[int, bytes] | None:
        """(round, update blob) answering a task; None for an emptied (closed) task."""
        if not task_payload:
            return None
        msg = decode(task_payload, fleet=self.fleet, expect=MsgType.TASK, where=f"task of {agent}")
        env, body = msg.envelope, msg.envelope.body
        g = index % GROUPS
        start = msg.adapter_tensors
        tensors = {n: (np.asarray(start[n]) + d).astype(np.float32) for n, d in self.deltas[g].items()}
        kinds = list(body.get("stats", []))
        digest = self.digest(agent)
        out_body = {
            "bundle_id": self.manifest.bundle_id,
            "num_samples": int(self.hist[g].sum()),
            "metrics": {"accuracy_before": 0.5, "accuracy_after": 0.6, "steps": 1.0},
            "train_seconds": 0.0,
            "skipped_images": 0,
        }
        if kinds:
            out_body["data_digest"] = digest
            tensors[STAT_LABEL_HIST] = self.hist[g]
            if "gaussian" in kinds and body.get("stats_digest") != digest:
                tensors[STAT_MEAN] = self.mean[g]
                tensors[STAT_VAR] = self.var[g]
        out = Envelope(
            MsgType.UPDATE, self.fleet, agent, round=env.round, base_version=env.base_version, body=out_body
        )
        return env.round, self._encode(out, tensors)


# ---- the fleet: N paho clients on one selector ----------------------------------------------------
@dataclass
class Counters:
    connected: int = 0
    status_acked: int = 0
    tasks: dict[int, int] = field(default_factory=dict)  # round -> tasks received
    updates_acked: dict[int, int] = field(default_factory=dict)
    bytes_out: int = 0
    bytes_in: int = 0
    disconnects: int = 0
    refused_subs: int = 0
    first: dict[str, float] = field(default_factory=dict)  # event -> first time
    last: dict[str, float] = field(default_factory=dict)  # event -> last time

    def mark(self, event: str) -> None:
        now = time.time()
        self.first.setdefault(event, now)
        self.last[event] = now


class SimFleet:
    """N simulated agents sharing one selector loop (call `step()` from one thread).

    `passwords`: each agent's broker login (username = agent id), from its kit. `hold`: updates are
    prepared as tasks arrive but published only by `release()` (an intake benchmark's burst)."""

    def __init__(
        self,
        urls: list[str],
        n: int,
        prepared: Prepared,
        prefix: str = "sim",
        passwords: dict[str, str] | None = None,
        hold: bool = False,
    ):
        self.prep = prepared
        self.passwords = passwords or {}
        self.hold = hold
        self.held: list[tuple[int, int, bytes]] = []  # (agent index, round, update) until `release`
        self.topics = Topics(prepared.fleet)
        self.sel = selectors.DefaultSelector()
        self.c = Counters()
        self.ids = agent_ids(n, prefix)
        self.addrs = [BrokerAddress.parse(u) for u in urls]
        self.clients: list[paho.Client] = []
        self.pending: list[tuple[int, bytes]] = []  # (agent index, task payload) to answer
        self.pub_mids: dict[tuple[int, int], tuple[str, int]] = {}  # (agent, mid) -> (kind, round)
        self.answered: set[tuple[int, int]] = set()  # (agent, round) answered
        self.reject_errors: list[str] = []
        self.resubscribe: list[tuple[float, int]] = []  # heap of (when, agent index) after a refused SUBACK
        self.sub_tries: dict[int, int] = {}  # agent index -> refused SUBACKs so far

    # paho external-loop socket callbacks
    def _sock_open(self, client, userdata, sock) -> None:
        self.sel.register(sock, selectors.EVENT_READ, client)

    def _sock_close(self, client, userdata, sock) -> None:
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _want_write(self, client, userdata, sock) -> None:
        try:
            self.sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)
        except (KeyError, ValueError):
            pass

    def _no_write(self, client, userdata, sock) -> None:
        try:
            self.sel.modify(sock, selectors.EVENT_READ, client)
        except (KeyError, ValueError):
            pass

    def _client(self, i: int) -> paho.Client:
        agent = self.ids[i]
        cl = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=agent,
            clean_session=False,
            protocol=paho.MQTTv311,
            userdata=i,
        )
        cl.max_inflight_messages_set(20)
        if agent in self.passwords:
            cl.username_pw_set(agent, self.passwords[agent])
        cl.will_set(self.topics.status(agent), self.prep.status(agent, "offline"), qos=1, retain=True)
        cl.on_socket_open = self._sock_open
        cl.on_socket_close = self._sock_close
        cl.on_socket_register_write = self._want_write
        cl.on_socket_unregister_write = self._no_write
        cl.on_connect = self._on_connect
        cl.on_message = self._on_message
        cl.on_publish = self._on_publish
        cl.on_disconnect = self._on_disconnect
        cl.on_subscribe = self._on_subscribe
        return cl

    def connect_all(self, progress=None, rate: float = 0.0) -> None:
        """Open every agent's connection: all at once, or `rate` per second (a fleet starting up)."""
        t0 = time.monotonic()
        for i in range(len(self.ids)):
            cl = self._client(i)
            a = self.addrs[i % len(self.addrs)]
            cl.connect(a.host, a.port, KEEPALIVE)
            self.clients.append(cl)
            while rate and time.monotonic() < t0 + (i + 1) / rate:
                self.step(0.01)
            if i % 200 == 199:  # let the broker's CONNACKs in while we open more
                self.step(0)
                if progress:
                    progress(i + 1)

    def _on_connect(self, client, i, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.reject_errors.append(f"{self.ids[i]}: connect refused: {reason_code}")
            return
        self.c.connected += 1
        self.c.mark("connack")
        agent = self.ids[i]
        client.subscribe(self.topics.task(agent), 1)
        payload = self.prep.status(agent, "online")
        info = client.publish(self.topics.status(agent), payload, qos=1, retain=True)
        self.pub_mids[(i, info.mid)] = ("status", 0)
        self.c.bytes_out += len(payload)

    def _on_subscribe(self, client, i, mid, reason_codes, properties) -> None:
        # As MqttSession does: a refused subscription (NATS under a burst) is asked for again,
        # backing off with jitter (a refused try may still leave a consumer behind on NATS).
        if any(rc.is_failure for rc in reason_codes):
            self.c.mark("suback_refused")
            self.c.refused_subs += 1
            tries = self.sub_tries[i] = self.sub_tries.get(i, 0) + 1
            heapq.heappush(self.resubscribe, (time.monotonic() + resubscribe_delay(tries), i))

    def _on_disconnect(self, client, i, flags, reason_code, properties) -> None:
        self.c.disconnects += 1
        self.c.connected -= 1

    def _on_message(self, client, i, msg) -> None:
        self.c.bytes_in += len(msg.payload)
        if msg.payload:
            self.pending.append((i, bytes(msg.payload)))

    def _on_publish(self, client, i, mid, reason_code, properties) -> None:
        kind, rnd = self.pub_mids.pop((i, mid), ("?", 0))
        if kind == "status":
            self.c.status_acked += 1
            self.c.mark("status_acked")
        elif kind == "update":
            self.c.updates_acked[rnd] = self.c.updates_acked.get(rnd, 0) + 1
            self.c.mark(f"update_acked_r{rnd}")

    def _answer(self) -> None:
        pending, self.pending = self.pending, []
        for i, payload in pending:
            out = self.prep.update(self.ids[i], i, payload)
            if out is None:
                continue
            rnd, blob = out
            self.c.tasks[rnd] = self.c.tasks.get(rnd, 0) + 1
            self.c.mark(f"task_r{rnd}")
            if (i, rnd) in self.answered:  # a redelivered task: the agent republishes the same update
                continue
            self.answered.add((i, rnd))
            if self.hold:
                self.held.append((i, rnd, blob))
            else:
                self.send_update(i, rnd, blob)

    def send_update(self, i: int, rnd: int, blob: bytes) -> None:
        info = self.clients[i].publish(self.topics.update(self.ids[i]), blob, qos=1)
        self.pub_mids[(i, info.mid)] = ("update", rnd)
        self.c.bytes_out += len(blob)
        self.c.mark(f"update_sent_r{rnd}")

    def release(self, keep: int = 0) -> int:
        """Publish the held updates now but the last `keep` (paho queues them; `step()` writes them
        out); later tasks are answered at once. Returns how many went out."""
        cut = len(self.held) - keep
        out, self.held, self.hold = self.held[:cut], self.held[cut:], False
        for i, rnd, blob in out:
            self.send_update(i, rnd, blob)
        return len(out)

    def step(self, timeout: float) -> None:
        for key, events in self.sel.select(timeout):
            cl = key.data
            if events & selectors.EVENT_READ:
                cl.loop_read()
            if events & selectors.EVENT_WRITE:
                cl.loop_write()
        if self.pending:
            self._answer()
        while self.resubscribe and self.resubscribe[0][0] <= time.monotonic():
            i = heapq.heappop(self.resubscribe)[1]
            self.clients[i].subscribe(self.topics.task(self.ids[i]), 1)

    def misc(self) -> None:
        for cl in self.clients:
            cl.loop_misc()

    def close(self) -> None:
        for cl in self.clients:
            try:
                cl.disconnect()
                cl.loop_write()
            except Exception:  # closing: the broker cleans up what we could not say
                pass
        self.sel.close()
