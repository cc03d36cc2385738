"""`fedclip-coord serve --password-file`: the broker password from a private file,
never from a world-readable one."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedclip.coordinator.config import CoordConfig
from fedclip.sdk.errors import ConfigError

BASE = {"broker": "mqtt://127.0.0.1:1", "fleet": "f1", "bundle": "b", "state": "s"}


def test_password_comes_from_a_private_file(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    pw.chmod(0o600)
    cfg = CoordConfig.load(None, {**BASE, "username": "fedclip.coordinator", "password_file": str(pw)})
    assert cfg.password is None
    cfg = cfg.with_secret()
    assert (cfg.username, cfg.password, cfg.password_file) == ("fedclip.coordinator", "s3cret", None)
    with pytest.raises(ConfigError, match="give one, not both"):
        CoordConfig.load(None, {**BASE, "password": "x", "password_file": str(pw)})
    pw.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        cfg = CoordConfig.load(None, {**BASE, "password_file": str(pw)}).with_secret()


def test_serve_refuses_a_world_readable_or_missing_password_file_in_one_line(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    pw.chmod(0o644)
    args = [
        "--broker",
        BASE["broker"],
        "--fleet",
        "f1",
        "--bundle",
        str(tmp_path),
        "--state",
        str(tmp_path / "s"),
    ]
    for path, words in ((pw, "readable by every user"), (tmp_path / "none", "cannot read")):
        r = subprocess.run(
            [sys.executable, "-m", "fedclip.coordinator.cli", "serve", *args, "--password-file", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 2 and words in r.stderr and r.stderr.count("\n") == 1, r.stderr
