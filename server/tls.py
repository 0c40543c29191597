"""Transport security material for a federation: a CA, the SuperLink's certificate, SuperNode keys.

    python deploy/make_certs.py --out certs --host superlink.example.org     # operator: CA + SuperLink
    python deploy/make_site_key.py --out keys --name hospital-a              # each site: its node key

The SuperLink serves TLS with the CA-signed certificate (``--ssl-ca-certfile ca.crt --ssl-certfile
superlink.crt --ssl-keyfile superlink.key``); SuperNodes and ``flwr`` verify it with ``ca.crt``
(``--root-certificates``). With ``--enable-supernode-auth`` the SuperLink accepts only SuperNodes whose
public key the operator registered (``flwr supernode register NAME.pub CONNECTION``); each SuperNode
signs with its private key (``--auth-supernode-private-key NAME.key``). Keys are ECDSA P-384, the
curve Flower's node authentication expects. Private keys are written readable by their owner only.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALID_DAYS = 365


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey, openssh: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = serialization.PrivateFormat.OpenSSH if openssh else serialization.PrivateFormat.PKCS8
    data = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedvlp federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(out: str | Path, name: str = "fedvlp federation CA") -> tuple[Path, Path]:
    """A self-signed CA: ``ca.crt`` (give to every site) and ``ca.key`` (keep with the operator)."""
    out = Path(out)
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA384()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(out / "ca.key", key)
    return out / "ca.crt", out / "ca.key"


def make_server_cert(out: str | Path, ca_dir: str | Path, hosts: list[str], name: str = "superlink") -> tuple[Path, Path]:
    """``NAME.crt``/``NAME.key`` signed by the CA in ``ca_dir``, valid for ``hosts`` (names or IPs)."""
    out, ca_dir = Path(out), Path(ca_dir)
    if not hosts:
        raise ValueError("make_server_cert needs at least one host name or IP address the sites connect to.")
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP384R1())
    alt: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt.append(x509.DNSName(host))
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(out / f"{name}.key", key)
    return out / f"{name}.crt", out / f"{name}.key"


def make_node_key(out: str | Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's key pair in OpenSSH format (what ``ssh-keygen -t ecdsa -b 384`` writes, and what
    Flower reads): ``NAME.key`` (stays at the site) and ``NAME.pub`` (for ``flwr supernode register``)."""
    out = Path(out)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(out / f"{name}.key", key, openssh=True)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    (out / f"{name}.pub").write_bytes(public + b"\n")
    return out / f"{name}.key", out / f"{name}.pub"
