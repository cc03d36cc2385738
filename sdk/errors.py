"""One exception family. Every message is one line a user can act on; CLIs print it and exit 2."""

from __future__ import annotations


class FedclipError(Exception):
    """Base of every error fedclip raises on purpose."""


class ConfigError(FedclipError):
    """A config file or flag is invalid; the message names the field."""


class BundleError(FedclipError):
    """A bundle is missing, corrupt, or does not match its manifest."""


class AdapterError(FedclipError):
    """An adapter file or tensor set does not fit its bundle."""


class ExportError(FedclipError):
    """`fedclip-coord export` cannot build what was asked."""


class WireError(FedclipError):
    """A message failed validation; it is logged and dropped."""


class DataError(FedclipError):
    """A dataset on disk is missing or does not match the bundle's task."""


class BackendError(FedclipError):
    """The requested ONNX Runtime backend or execution provider is not available."""


class StateError(FedclipError):
    """The agent's state dir cannot be read or written (full disk, read-only, corrupt)."""


class BrokerError(FedclipError):
    """A broker fedclip starts itself (embedded amqtt, mosquitto) could not start or stop."""


class MqttError(FedclipError):
    """The broker refused us, cannot be reached, or did not acknowledge in time."""


class ConnectRefused(MqttError):
    """The broker answered CONNACK with a refusal (bad credentials, not authorized, ...)."""


class PublishTimeout(MqttError):
    """A QoS>0 publish was not acknowledged before its deadline (it may still be delivered later)."""
