"""TLS on the grpcio transport: a channel built from an upstream's `tls` setting, and grpcio's TLS errors in pplex's words.

The setting is the one `pplex.tls` validates: `true` (the system's roots: the
CA file OpenSSL's defaults name, as `ssl.create_default_context` uses) or
`{"ca_file", "cert_file", "key_file", "server_name"}`. `server_name` becomes
`grpc.ssl_target_name_override`: the name sent as SNI and checked against the
certificate. grpcio carries OpenSSL's reason codes in its error text
("...OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get local issuer
certificate..."); `tls_detail` turns them into the same one line the
in-reactor engine reports (`certificate verify failed: ...`).
"""
import re
import ssl

import grpc

from pplex.tls import describe_reason, hostname_mismatch

_OPENSSL_REASON = re.compile(r"OPENSSL_internal:([A-Z0-9_]+)(?::\s*([^:]*))?")
# Detail texts grpcio appends that say nothing about the cause.
_NO_DETAIL = {"", "OK", "Invalid certificate verification context"}


def _read(path):
    with open(path, "rb") as handle:
        return handle.read()


def system_roots():
    """The PEM bundle OpenSSL's default verify paths name (SSL_CERT_FILE honoured); None: grpcio's own."""
    path = ssl.get_default_verify_paths().cafile
    try:
        return _read(path) if path else None
    except OSError:
        return None


def make_channel(target, tls, options):
    """A grpcio channel to `target`: plaintext when `tls` is None/False, else TLS (mTLS with a cert/key)."""
    if not tls:
        return grpc.insecure_channel(target, options=options)
    spec = {} if tls is True else tls
    roots = _read(spec["ca_file"]) if spec.get("ca_file") else system_roots()
    key = _read(spec["key_file"]) if spec.get("key_file") else None
    chain = _read(spec["cert_file"]) if spec.get("cert_file") else None
    credentials = grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=chain)
    if spec.get("server_name"):
        options = [*options, ("grpc.ssl_target_name_override", spec["server_name"])]
    return grpc.secure_channel(target, credentials, options=options)


def tls_detail(details, server_name):
    """pplex's one line for a TLS failure in a grpcio error's details, or None when it is not one."""
    if not details:
        return None
    found = _OPENSSL_REASON.search(details)
    if found:
        detail = (found.group(2) or "").strip()
        return describe_reason(found.group(1), "" if detail in _NO_DETAIL else detail)
    if "Hostname Verification Check failed" in details:
        return hostname_mismatch(server_name)
    return None
