"""TLS certificates for the aggregation server and key pairs for site authentication.

The coordinator makes a private CA and a server certificate (SANs for every name/IP sites dial);
each hospital makes its own key pair and sends only the public half to be registered. Private keys
are written owner-only and nothing existing is ever overwritten: a replaced CA or site key would
silently lock every site out, so that takes a deliberate `rm` by a person.
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

from common.folders import Entry


class CredentialsExist(FileExistsError):
    """Refusal to overwrite a key or certificate."""


@dataclass(frozen=True)
class ServerCertificates:
    folder: Path
    ca_cert = Entry("ca.crt")
    ca_key = Entry("ca.key")
    server_cert = Entry("server.crt")
    server_key = Entry("server.key")

    def missing(self) -> list[Path]:
        """What `flower-superlink` needs and is not there (the CA key is not needed to serve)."""
        return [p for p in (self.ca_cert, self.server_cert, self.server_key) if not p.is_file()]


@dataclass(frozen=True)
class SiteKeys:
    folder: Path
    private_key = Entry("site.key")
    public_key = Entry("site.pub")


def _write_new(path: Path, data: bytes, private: bool) -> None:
    """Create `path` exclusively (never overwrite), owner-only for private material."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _refuse_existing(paths: list[Path], consequence: str) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise CredentialsExist(f"refusing to overwrite existing {', '.join(existing)}: move them away first "
                               f"if you really mean to replace them ({consequence})")


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def create_server_certificates(folder: Path, hostnames: list[str], valid_days: int = 825) -> ServerCertificates:
    """A self-signed CA and a server certificate whose SANs cover `hostnames` (names and IPs)."""
    certs = ServerCertificates(folder)
    _refuse_existing([certs.ca_cert, certs.ca_key, certs.server_cert, certs.server_key],
                     "every site would then need the new ca.crt")
    if not hostnames:
        raise ValueError("give at least one hostname or IP address that sites will use to reach the server")
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedseg federation"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "fedseg federation CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]))
        .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hostnames]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write_new(certs.ca_key, _pem_key(ca_key), private=True)
    _write_new(certs.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write_new(certs.server_key, _pem_key(server_key), private=True)
    _write_new(certs.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    return certs


def create_site_keys(folder: Path, comment: str = "") -> SiteKeys:
    """An EC P-384 key pair in OpenSSH format, the form Flower's SuperNode authentication reads."""
    keys = SiteKeys(folder)
    _refuse_existing([keys.private_key, keys.public_key], "the coordinator would then have to register the new site.pub")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_new(keys.private_key, private, private=True)
    _write_new(keys.public_key, public + (f" {comment}".encode() if comment else b"") + b"\n", private=False)
    return keys
