"""The paho-mqtt 2.x client a `MqttSession` drives, configured once: protocol, session, queues,
reconnect backoff, credentials and TLS.

Kept apart from the session's run-time logic (connect, failover, publish) so what goes on the wire
at CONNECT is readable in one place. Every bad setting is a one-line ConfigError here, before any
socket is opened.
"""

from __future__ import annotations

import ssl

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from fedclip.sdk.errors import ConfigError
from fedclip.sdk.mqtt_address import BrokerAddress

MAX_RECONNECT_DELAY = 30  # seconds: the longest pause between two reconnect attempts


def new_paho_client(
    address: BrokerAddress,
    client_id: str,
    *,
    v5: bool,
    clean_session: bool,
    manual_ack: bool,
    max_queue: int,
    username: str | None,
    password: str | None,
    ca_file: str | None,
    cert_file: str | None,
    key_file: str | None,
    insecure: bool,
) -> paho.Client:
    """A paho client for `address` (the first node of the cluster); credentials given here win over
    those in the URL. The callbacks are the session's to set."""
    if v5:
        # MQTT 5 has no clean_session flag at construction: the session's lifetime is a CONNECT
        # property (MqttSession sets SessionExpiryInterval).
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5, manual_ack=manual_ack
        )
    else:
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=paho.MQTTv311,
            manual_ack=manual_ack,
        )
    client.max_queued_messages_set(max_queue)
    client.reconnect_delay_set(min_delay=1, max_delay=MAX_RECONNECT_DELAY)
    user = username if username is not None else address.username
    pwd = password if password is not None else address.password
    if user is not None:
        client.username_pw_set(user, pwd)
    if address.tls:
        try:
            client.tls_set(
                ca_certs=ca_file, certfile=cert_file, keyfile=key_file, cert_reqs=ssl.CERT_REQUIRED
            )
        except (OSError, ValueError) as e:
            raise ConfigError(f"mqtt tls: cannot load CA/cert files ({e})") from None
        client.tls_insecure_set(insecure)
    elif ca_file or cert_file:
        raise ConfigError(f"mqtt tls: CA/cert files given but {address} is not mqtts://")
    return client
