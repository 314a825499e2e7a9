"""``fedmira certs``: a development PKI for a deployment on one machine or a test network.

It writes, under ``out``::

    ca/ca.crt, ca/ca.key                 the development CA (keep ca.key with the coordinator)
    superlink/server.crt, server.key      the SuperLink's TLS certificate (SAN 127.0.0.1, localhost
                                          and any --host) and key, plus a copy of ca.crt
    hospitals/<name>/supernode_key        a hospital's node-authentication private key (OpenSSH)
    hospitals/<name>/supernode_key.pub    its public key (OpenSSH, comment = hospital name)
    hospitals/<name>/ca.crt               the root certificate the hospital trusts
    allowed_supernodes.txt                the allow-list: one OpenSSH public key per line

Key types, as Flower 1.42 expects them: TLS certificates and keys are PEM (the SuperLink serves
HTTPS with them; the SuperNode verifies with ``--root-certificates``). SuperNode authentication
keys are elliptic-curve keys on a NIST curve (SECP384R1 here, as Flower's docs use), the private
key in OpenSSH format (``flower-supernode --auth-supernode-private-key`` reads it with
``load_ssh_private_key``) and the public key in OpenSSH format (``flwr supernode register`` reads
it with ``load_ssh_public_key``). Flower 1.42 has no allow-list file any more (``flower-superlink
--auth-list-public-keys`` is refused): the coordinator registers every key of
``allowed_supernodes.txt`` with ``flwr supernode register`` (``server/coordinator.py``).

Everything is generated with the ``cryptography`` package (already installed: Flower depends on
it) instead of shelling out to ``openssl``, so it works the same on every OS and needs no
OpenSSL command-line tool. ``ssh-keygen -t ecdsa -b 384 -N "" -f supernode_key`` makes an
equivalent hospital key.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmira.common.errors import FedmiraError

ALLOW_LIST = "allowed_supernodes.txt"
CURVE = ec.SECP384R1
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
CERT_DAYS = 365
CA_NAME = "fedmira dev root CA"


@dataclass(frozen=True)
class DevPki:
    """Paths of what :func:`make_dev_pki` wrote."""

    root: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    hospital_dirs: tuple[Path, ...]
    allow_list: Path


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, secret: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if secret:
        os.chmod(path, 0o600)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmira development CA"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(days: int = CERT_DAYS) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Return a self-signed CA certificate and its key."""
    key = ec.generate_private_key(CURVE())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(_name(CA_NAME)).issuer_name(_name(CA_NAME))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return cert, key


def _san(hosts: tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_server_cert(
    ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, hosts: tuple[str, ...],
    days: int = CERT_DAYS,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Return a TLS server certificate for the SuperLink, valid for ``hosts`` (IP addresses or names)."""
    key = ec.generate_private_key(CURVE())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return cert, key


def make_node_key(comment: str) -> tuple[bytes, bytes]:
    """Return a SuperNode authentication key pair: (OpenSSH private key, OpenSSH public key line)."""
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return private, public + f" {comment}\n".encode()


def hospital_names(count: int, names: list[str] | None = None) -> list[str]:
    """``names`` when given, else hospital_01 .. hospital_NN."""
    if names:
        bad = [n for n in names if not n or not n.replace("_", "").replace("-", "").isalnum()]
        if bad:
            raise FedmiraError(f"Hospital names may hold letters, digits, '-' and '_' only: {bad}.")
        if len(set(names)) != len(names):
            raise FedmiraError(f"Hospital names must be unique: {names}.")
        return names
    if count < 1:
        raise FedmiraError("--hospitals must be at least 1.")
    return [f"hospital_{i:02d}" for i in range(1, count + 1)]


def write_hospital_key(folder: Path, name: str, ca_pem: bytes) -> bytes:
    """Write one hospital's key pair and root certificate; returns its public key line."""
    private, public = make_node_key(name)
    _write(folder / "supernode_key", private, secret=True)
    _write(folder / "supernode_key.pub", public)
    _write(folder / "ca.crt", ca_pem)
    return public


def make_dev_pki(out: str | Path, hospitals: int = 3, *, names: list[str] | None = None,
                 hosts: tuple[str, ...] = (), days: int = CERT_DAYS) -> DevPki:
    """Write a development CA, the SuperLink certificate and hospital keys (see module doc).

    Parameters
    ----------
    out : str or Path
        Folder to write; must not hold a previous CA (keys are never overwritten).
    hospitals : int
        Number of hospital key pairs (ignored when ``names`` is given).
    names : list of str, optional
        Hospital names (folder names and key comments).
    hosts : tuple of str
        Extra host names / IP addresses the SuperLink certificate is valid for.
    days : int
        Validity of the certificates.

    Returns
    -------
    DevPki
        The paths written.
    """
    root = Path(out).resolve()
    if (root / "ca" / "ca.key").exists():
        raise FedmiraError(f"{root} already holds a CA; choose another out=DIR or delete it first.")
    who = hospital_names(hospitals, names)
    ca_cert, ca_key = make_ca(days)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    _write(root / "ca" / "ca.crt", ca_pem)
    _write(root / "ca" / "ca.key", _private_pem(ca_key), secret=True)
    all_hosts = tuple(dict.fromkeys((*DEFAULT_HOSTS, *hosts)))
    cert, key = make_server_cert(ca_cert, ca_key, all_hosts, days)
    _write(root / "superlink" / "server.crt", cert.public_bytes(serialization.Encoding.PEM))
    _write(root / "superlink" / "server.key", _private_pem(key), secret=True)
    _write(root / "superlink" / "ca.crt", ca_pem)
    folders = tuple(root / "hospitals" / name for name in who)
    lines = [write_hospital_key(folder, name, ca_pem) for folder, name in zip(folders, who)]
    _write(root / ALLOW_LIST, b"".join(lines))
    return DevPki(root, root / "ca" / "ca.crt", root / "superlink" / "server.crt",
                  root / "superlink" / "server.key", folders, root / ALLOW_LIST)


def read_allow_list(path: str | Path) -> list[tuple[str, str]]:
    """(name, OpenSSH public key line) per entry of an allow-list file.

    The file holds one OpenSSH public key per line (``ecdsa-sha2-nistp384 AAAA... name``); the
    comment names the hospital. Blank lines and lines starting with ``#`` are ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise FedmiraError(f"Allow-list {path} not found; `fedmira certs out=DIR` writes one "
                           f"({ALLOW_LIST}), or list the hospitals' supernode_key.pub lines in a file.")
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) < 2 or not parts[0].startswith("ecdsa-sha2-nistp"):
            raise FedmiraError(f"{path}:{number}: not an OpenSSH ECDSA public key (expected "
                               "`ecdsa-sha2-nistp384 AAAA... name`, the content of supernode_key.pub).")
        name = parts[2] if len(parts) > 2 else f"key_{number}"
        entries.append((name, " ".join(parts[:3])))
    if not entries:
        raise FedmiraError(f"Allow-list {path} holds no public keys.")
    return entries


def certs_command(out: str, hospitals: int = 3, names: list[str] | None = None,
                  hosts: list[str] | None = None, days: int = CERT_DAYS) -> int:
    """``fedmira certs out=DIR --hospitals N``: write the development PKI and say what goes where."""
    pki = make_dev_pki(out, hospitals, names=names, hosts=tuple(hosts or ()), days=days)
    print(f"Development PKI written to {pki.root}")
    print(f"  coordinator: {pki.server_cert.parent}/ (server.crt, server.key, ca.crt) and {pki.allow_list}")
    print(f"  keep private: {pki.root / 'ca' / 'ca.key'} (signs certificates; never send it)")
    for folder in pki.hospital_dirs:
        print(f"  send to {folder.name}: {folder}/ (supernode_key, supernode_key.pub, ca.crt)")
    print("A development CA is for tests and pilots; docs/deployment.md explains how to use your own PKI.")
    return 0
