"""deploy/: the certificate and key scripts make material Flower accepts, and the start scripts use it."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

REPO = Path(__file__).resolve().parents[2]


def run_script(name: str, *args: str) -> str:
    out = subprocess.run([sys.executable, str(REPO / "deploy" / name), *args], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_make_certs_signs_a_superlink_certificate_for_the_given_hosts(tmp_path):
    run_script("make_certs.py", "--out", str(tmp_path), "--host", "superlink.example.org", "--host", "10.1.2.3")
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((tmp_path / "superlink.crt").read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # the given names, and loopback (where the Fleet gateway and the operator's flwr reach the SuperLink)
    assert names.get_values_for_type(x509.DNSName) == ["superlink.example.org", "localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.1.2.3", "127.0.0.1"]
    for private in ("ca.key", "superlink.key"):
        assert stat.S_IMODE((tmp_path / private).stat().st_mode) == 0o600
    key = serialization.load_pem_private_key((tmp_path / "superlink.key").read_bytes(), password=None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()


def test_make_site_key_writes_a_p384_pair_in_the_format_flower_reads(tmp_path):
    run_script("make_site_key.py", "--out", str(tmp_path), "--name", "hospital-a")
    private = serialization.load_ssh_private_key((tmp_path / "hospital-a.key").read_bytes(), password=None)
    public = serialization.load_ssh_public_key((tmp_path / "hospital-a.pub").read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()
    assert stat.S_IMODE((tmp_path / "hospital-a.key").stat().st_mode) == 0o600
    from flwr.cli.supernode.register import try_load_public_key  # what `flwr supernode register` runs

    assert try_load_public_key(tmp_path / "hospital-a.pub")


@pytest.mark.parametrize("script,flags", [
    ("start_superlink.sh", ["--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth",
                            "--database"]),
    ("start_supernode.sh", ["--root-certificates", "--auth-supernode-private-key", "--node-config"]),
])
def test_the_start_scripts_use_tls_and_authentication(script, flags):
    text = (REPO / "deploy" / script).read_text()
    assert all(flag in text for flag in flags) and "--insecure" not in text
    assert subprocess.run(["bash", "-n", str(REPO / "deploy" / script)]).returncode == 0
    help_text = subprocess.run([Path(sys.executable).with_name(
        "flower-superlink" if "superlink" in script else "flower-supernode"), "--help"],
        capture_output=True, text=True, timeout=60).stdout
    assert all(flag in help_text for flag in flags)  # every flag exists in this Flower
