"""fedclip.sdk: what the coordinator and the device agent share. Torch-free by design."""

from fedclip.sdk.errors import FedclipError

__all__ = ["FedclipError"]
