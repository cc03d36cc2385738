"""Throwaway TLS certificates for a broker under test: a CA, a server cert and a client cert (openssl).

`MosquittoBroker(tls=True)` uses them so the TLS paths of MqttSession (server verification, client
certificates) run against a real TLS listener; they live two days and never leave the temp dir.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from fedclip.sdk.broker_ports import LOCALHOST
from fedclip.sdk.errors import BrokerError


def _openssl(*args: str, cwd: Path) -> None:
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise BrokerError(f"openssl {args[0]} failed: {r.stderr.strip().splitlines()[-1:]}")


def make_test_certs(out: Path, host: str = LOCALHOST) -> dict[str, Path]:
    """A throwaway CA, a server cert for `host` and a client cert, all signed by the CA (openssl)."""
    if shutil.which("openssl") is None:
        raise BrokerError("openssl is needed to make TLS certificates")
    out.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=fedclip-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        cwd=out,
    )
    (out / "server.ext").write_text(f"subjectAltName=IP:{host},DNS:localhost\n")
    for name, subj in (("server", "/CN=localhost"), ("client", "/CN=fedclip-client")):
        _openssl(
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            subj,
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=out,
        )
        ext = ["-extfile", "server.ext"] if name == "server" else []
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            f"{name}.crt",
            *ext,
            cwd=out,
        )
    return {k: out / f"{k}" for k in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}
