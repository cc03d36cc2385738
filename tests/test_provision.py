"""`fedclip-coord provision`: fleet keys, startup kits, the enrolment registry, revocation (no broker here;
tests/test_broker_acl.py runs the generated broker configs)."""

from __future__ import annotations

import stat
import subprocess
import sys
import tarfile
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from fedclip.coordinator.enrolment import Enrolment
from fedclip.coordinator.provision import (
    COORDINATOR_PASSWORD,
    DEVICE_KEY,
    KIT_PASSWORD,
    Provisioner,
)
from fedclip.coordinator.rollout import KEY_DIR
from fedclip.device_agent.config import AgentConfig
from fedclip.sdk.broker_acl import COORDINATOR_USER, mosquitto_hash, mosquitto_verify
from fedclip.sdk.errors import ConfigError
from fedclip.sdk.signing import PRIVATE_KEY_NAME, PUBLIC_KEY_NAME, ensure_keypair, load_private_key

FLEET = "prov-fleet"
PRIVATE = (DEVICE_KEY, KIT_PASSWORD, "client.key")


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def prov(tmp_path):
    return Provisioner.init(tmp_path / "state", FLEET, broker="mqtts://broker.example:8883")


def test_init_makes_the_fleet_keys_once_and_shares_the_rollout_signing_key(tmp_path):
    state = tmp_path / "state"
    # A coordinator that already signed rollouts keeps its key: provisioning adopts it.
    existing, _ = ensure_keypair(state / KEY_DIR)
    prov = Provisioner.init(state, FLEET)
    key = load_private_key(state / KEY_DIR / PRIVATE_KEY_NAME)
    assert key.private_bytes_raw() == existing.private_bytes_raw()
    assert _mode(state / KEY_DIR / PRIVATE_KEY_NAME) == 0o600
    assert _mode(prov.dir / "ca.key") == 0o600
    assert _mode(prov.coordinator_password_file) == 0o600
    ca = x509.load_pem_x509_certificate((prov.dir / "ca.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server = x509.load_pem_x509_certificate((prov.dir / "server.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)

    password = prov.coordinator_password_file.read_text()
    ca_bytes = (prov.dir / "ca.crt").read_bytes()
    again = Provisioner.init(state, FLEET, hosts=["10.0.0.5", "broker.lan"])
    assert (again.dir / "ca.crt").read_bytes() == ca_bytes  # the CA and the login are kept
    assert again.coordinator_password_file.read_text() == password
    server = x509.load_pem_x509_certificate((again.dir / "server.crt").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["broker.lan"]  # reissued for the new hosts
    with pytest.raises(ConfigError, match="already provisioned for fleet"):
        Provisioner.init(state, "other-fleet")


def test_a_kit_folder_holds_everything_a_device_needs_with_private_files_0600(prov, tmp_path):
    kit = prov.add("cam-01", groups=("lobby", "floor2"), tls=True, out=tmp_path / "kits" / "cam-01")
    d = kit.path
    assert set(kit.files) == {
        "agent.yaml",
        DEVICE_KEY,
        "device_ed25519.pub.pem",
        KIT_PASSWORD,
        PUBLIC_KEY_NAME,
        "ca.crt",
        "client.crt",
        "client.key",
    }
    assert _mode(d) == 0o700
    for name in PRIVATE:
        assert _mode(d / name) == 0o600, name
    assert (d / PUBLIC_KEY_NAME).read_bytes() == (prov.coordinator_public_key).read_bytes()

    # agent.yaml loads as the agent's own config as it is, every path resolved inside the kit
    cfg = AgentConfig.load(d / "agent.yaml", {})
    assert (cfg.id, cfg.fleet, cfg.username, cfg.groups) == ("cam-01", FLEET, "cam-01", ("lobby", "floor2"))
    assert cfg.broker == "mqtts://broker.example:8883"
    assert cfg.secret() == (d / KIT_PASSWORD).read_text().strip()
    for path in (cfg.ca_file, cfg.cert_file, cfg.key_file, cfg.coordinator_key, cfg.device_key):
        assert path.is_file() and path.parent == d

    # the enrolled key is the kit's key; the login hash is the kit's password
    reg = Enrolment.load(prov.state)
    device_key = load_private_key(d / DEVICE_KEY)
    assert reg.public_key("cam-01") == device_key.public_key().public_bytes_raw()
    assert cfg.signing_key().public_key().public_bytes_raw() == reg.public_key("cam-01")
    assert reg.groups("cam-01") == ("lobby", "floor2")
    assert reg.enrolled() == ["cam-01"]
    assert mosquitto_verify(cfg.secret(), reg.device("cam-01").mosquitto_hash)
    assert not mosquitto_verify("wrong", reg.device("cam-01").mosquitto_hash)

    # the client certificate is the fleet CA's, for this device, with a P-256 key
    ca = x509.load_pem_x509_certificate((prov.dir / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((d / "client.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.rfc4514_string() == "CN=cam-01"
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert format(cert.serial_number, "x") == reg.device("cam-01").cert_serial


def test_a_kit_tarball_keeps_the_modes_and_is_itself_private(prov, tmp_path):
    kit = prov.add("cam-02", tar=tmp_path / "cam-02.tar.gz")
    assert _mode(kit.path) == 0o600
    with tarfile.open(kit.path) as tf:
        members = {m.name: m for m in tf.getmembers()}
    assert stat.S_IMODE(members[f"cam-02/{DEVICE_KEY}"].mode) == 0o600
    assert stat.S_IMODE(members[f"cam-02/{KIT_PASSWORD}"].mode) == 0o600
    assert "cam-02/agent.yaml" in members


def test_revoke_refuses_the_device_and_reissue_rotates_its_key(prov, tmp_path):
    first = prov.add("cam-03", out=tmp_path / "k1")
    old_key = Enrolment.load(prov.state).public_key("cam-03")
    dev, rewritten = prov.revoke("cam-03", "stolen")
    assert dev.revoked and dev.revoked_reason == "stolen" and rewritten == []
    reg = Enrolment.load(prov.state)  # a second reader (the coordinator) sees it at once
    assert reg.is_revoked("cam-03") and reg.public_key("cam-03") is None and reg.enrolled() == []
    assert "cam-03" not in prov.registry.broker_acl().mosquitto_passwd()
    with pytest.raises(ConfigError, match="already revoked"):
        prov.add("cam-03", out=tmp_path / "k2")

    prov.add("cam-03", out=tmp_path / "k2", force=True)
    assert not reg.is_revoked("cam-03")
    assert reg.public_key("cam-03") not in (None, old_key)
    assert (first.path / KIT_PASSWORD).read_text() != (tmp_path / "k2" / KIT_PASSWORD).read_text()
    assert reg.public_key("nobody") is None and not reg.is_revoked("nobody") and reg.groups("nobody") == ()


def test_revoke_rewrites_the_broker_files_written_before(prov, tmp_path):
    prov.add("cam-04", out=tmp_path / "k4")
    prov.add("cam-05", out=tmp_path / "k5")
    prov.write_broker("mosquitto", tmp_path / "mosq", port=1883)
    prov.write_broker("amqtt", tmp_path / "amqtt", port=1884)
    acl = (tmp_path / "mosq" / "acl").read_text()
    assert "user cam-04\n" in acl and f"user {COORDINATOR_USER}\n" in acl
    assert _mode(tmp_path / "mosq" / "passwd") == 0o600
    conf = (tmp_path / "mosq" / "conf.d" / "fedclip.conf").read_text()
    assert "allow_anonymous false" in conf and "listener 1883 127.0.0.1" in conf
    assert "max_inflight_messages 1024" in conf  # lets the intake's group commit fill its batches

    # rotating the coordinator's login (delete its file, init again) rewrites the broker files too
    old_hash = (tmp_path / "mosq" / "passwd").read_text().splitlines()[0]
    prov.coordinator_password_file.unlink()
    Provisioner.init(prov.state, FLEET, broker=prov.settings.broker)
    new_hash = (tmp_path / "mosq" / "passwd").read_text().splitlines()[0]
    assert new_hash.startswith(f"{COORDINATOR_USER}:") and new_hash != old_hash

    _, rewritten = Provisioner.open(prov.state).revoke("cam-04")
    assert tmp_path / "mosq" / "passwd" in rewritten and tmp_path / "amqtt" / "fleet-acl.json" in rewritten
    for name in ("mosq/passwd", "mosq/acl", "amqtt/fleet-acl.json"):
        text = (tmp_path / name).read_text()
        assert "cam-04" not in text and "cam-05" in text, name


def test_mosquitto_hash_matches_mosquitto_passwd(tmp_path):
    tool = subprocess.run(["which", "mosquitto_passwd"], capture_output=True, text=True).stdout.strip()
    if not tool:
        pytest.skip("mosquitto_passwd is not installed")
    pw = tmp_path / "pw"
    pw.touch()
    subprocess.run([tool, "-b", str(pw), "u", "s3cret"], check=True, timeout=30)
    theirs = pw.read_text().strip().split(":", 1)[1]
    assert mosquitto_verify("s3cret", theirs)
    assert not mosquitto_verify("s3cret!", theirs)
    assert mosquitto_verify("s3cret", mosquitto_hash("s3cret"))


@pytest.fixture
def _coord(monkeypatch, capsys):
    """`fedclip-coord provision ARGS` in this process (the CLI's own entry point, exit code and
    stderr included): a subprocess per call would cost seconds of interpreter start each."""
    from fedclip.coordinator.cli import main

    def call(*args: str) -> SimpleNamespace:
        monkeypatch.setattr(sys, "argv", ["fedclip-coord", "provision", *args])
        with pytest.raises(SystemExit) as e:
            main()
        out = capsys.readouterr()
        return SimpleNamespace(returncode=e.value.code, stdout=out.out, stderr=out.err)

    return call


def test_cli_provisions_and_errors_are_one_line(tmp_path, _coord):
    state = str(tmp_path / "state")
    r = _coord("add", "cam-x", "--state", state, "--out", str(tmp_path / "k"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "provision init" in r.stderr
    r = _coord("init", "--state", state, "--fleet", FLEET)
    assert r.returncode == 0, r.stderr
    assert f"--username {COORDINATOR_USER} --password-file" in r.stdout
    assert (tmp_path / "state" / "provision" / COORDINATOR_PASSWORD).is_file()
    r = _coord("broker", "--state", state, "--out", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    r = _coord("add", "cam-x", "--state", state, "--tar", str(tmp_path / "cam-x.tgz"), "--group", "g1")
    assert r.returncode == 0, r.stderr
    r = _coord("add", "cam-y", "cam-z", "--state", state, "--kits", str(tmp_path / "kits"))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "kits").iterdir()) == ["cam-y.tar.gz", "cam-z.tar.gz"]
    acl = (tmp_path / "b" / "acl").read_text()
    assert all(f"user {a}\n" in acl for a in ("cam-x", "cam-y", "cam-z"))  # rewritten after the batch
    for bad in (
        ("add", "cam/x", "--state", state, "--out", str(tmp_path / "k2")),
        ("add", "cam-x", "--state", state, "--out", str(tmp_path / "k3")),
        ("add", "cam-w", "--state", state),
        ("add", "cam-v", "cam-w", "--state", state, "--out", str(tmp_path / "k4")),
        ("revoke", "nobody", "--state", state),
        ("broker", "--state", state, "--out", str(tmp_path / "b"), "--kind", "nginx"),
    ):
        r = _coord(*bad)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, (
            bad,
            r.stderr,
        )
    r = _coord("revoke", "cam-x", "--state", state, "--reason", "lost")
    assert r.returncode == 0 and "revoked" in r.stdout
    r = _coord("list", "--state", state)
    assert r.returncode == 0 and "cam-x" in r.stdout and "lost" in r.stdout


def test_a_new_key_drops_the_statistics_held_under_the_old_one(prov, tmp_path):
    from fedclip.coordinator.store import Store

    prov.add("cam-06", out=tmp_path / "k6")
    prov.add("cam-07", out=tmp_path / "k7")
    with Store(prov.state) as store:  # the coordinator holds statistics for both
        for agent in ("cam-06", "cam-07"):
            store.db.write(
                lambda c, a=agent: c.execute("INSERT INTO agent_stats VALUES(?, 1, 'digest', 'blob')", (a,))
            )
    prov.add("cam-06", out=tmp_path / "k6b", force=True)  # re-issued: a new key
    with Store(prov.state, readonly=True) as store:
        assert store.agent_stats("cam-06") is None  # asked for again with the next task
        assert store.agent_stats("cam-07") is not None
