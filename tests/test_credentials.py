"""Certificates and site keys: a chain TLS clients accept, owner-only private keys, no overwrites."""

import ssl
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from common.credentials import CredentialsExist, create_server_certificates, create_site_keys


def test_server_certificate_chains_to_the_ca_and_names_every_host(tmp_path):
    certs = create_server_certificates(tmp_path / "certs", ["fedseg.example.org", "10.1.2.3", "localhost"])
    context = ssl.create_default_context(cafile=str(certs.ca_cert))
    assert len(context.get_ca_certs()) == 1
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["fedseg.example.org", "localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    for private in (certs.ca_key, certs.server_key):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    with pytest.raises(CredentialsExist):
        create_server_certificates(tmp_path / "certs", ["other"])
    assert x509.load_pem_x509_certificate(certs.ca_cert.read_bytes()) == ca  # untouched


def test_site_keys_are_openssh_p384_and_never_overwritten(tmp_path):
    keys = create_site_keys(tmp_path, "st-mary")
    private = serialization.load_ssh_private_key(keys.private_key.read_bytes(), None)
    public = serialization.load_ssh_public_key(keys.public_key.read_bytes())
    assert private.curve.name == "secp384r1" and public == private.public_key()
    assert keys.public_key.read_text().strip().endswith("st-mary")
    assert stat.S_IMODE(keys.private_key.stat().st_mode) == 0o600
    before = keys.private_key.read_bytes()
    with pytest.raises(CredentialsExist, match="register the new site.pub"):
        create_site_keys(tmp_path)
    assert keys.private_key.read_bytes() == before
