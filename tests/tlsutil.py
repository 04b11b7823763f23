"""Test certificates made on the spot with the `cryptography` package: CAs, servers, clients.

    certs = make_certs(tmp_path)
    certs.ca            # PEM path of the test CA
    certs.server_cert   # for 127.0.0.1, ::1 and localhost, signed by the CA (key: server_key)
    certs.client_cert   # a client certificate signed by the CA (key: client_key)
    certs.other_ca      # a second CA that signed nothing here: the "wrong CA"

Keys are EC P-256 (fast to make); certificates are valid from an hour ago for
a day. Nothing is cached across tests: each call writes fresh files to the
directory it is given.
"""
import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAMES = ("localhost", "127.0.0.1", "::1")


def _name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pplex tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _builder(subject, issuer, public_key):
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1)))


class Authority:
    """A self-signed CA that issues leaf certificates."""

    def __init__(self, common_name):
        self.key = _key()
        self.name = _name(common_name)
        builder = _builder(self.name, self.name, self.key.public_key())
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
        self.cert = builder.sign(self.key, hashes.SHA256())

    def issue(self, common_name, names=(), client=False):
        """(certificate, key) for `common_name`, with `names` (DNS names or IP literals) as SANs."""
        key = _key()
        builder = _builder(_name(common_name), self.name, key.public_key())
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            self.key.public_key()), critical=False)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        return builder.sign(self.key, hashes.SHA256()), key


def _san(name):
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def write_cert(path, cert):
    Path(path).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


def write_key(path, key):
    Path(path).write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    return str(path)


@dataclass
class Certs:
    """Paths (str) of PEM files, and the bytes grpcio's credentials want."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str
    other_client_cert: str   # signed by other_ca: a client the server must not trust
    other_client_key: str

    def read(self, name):
        return Path(getattr(self, name)).read_bytes()


def make_certs(directory, server_names=SERVER_NAMES, client_name="pplex test client"):
    """Write a CA, a server and a client certificate it signed, and an unrelated CA, into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ca = Authority("pplex test CA")
    other = Authority("unrelated test CA")
    server, server_key = ca.issue(server_names[0] if server_names else "server", server_names)
    client, client_key = ca.issue(client_name, client=True)
    stranger, stranger_key = other.issue("stranger", client=True)
    return Certs(
        ca=write_cert(directory / "ca.pem", ca.cert),
        server_cert=write_cert(directory / "server.pem", server),
        server_key=write_key(directory / "server.key", server_key),
        client_cert=write_cert(directory / "client.pem", client),
        client_key=write_key(directory / "client.key", client_key),
        other_ca=write_cert(directory / "other-ca.pem", other.cert),
        other_client_cert=write_cert(directory / "stranger.pem", stranger),
        other_client_key=write_key(directory / "stranger.key", stranger_key),
    )
