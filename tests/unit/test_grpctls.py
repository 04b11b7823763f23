"""grpcio's TLS error texts in pplex's one-line wording, and the upstream `tls` key in the config."""
import pytest

from pplex.config import validate
from pplex.errors import ConfigError
from pplex.grpctls import tls_detail
from tests.tlsutil import make_certs

# Texts as grpcio 1.85 reports them in an RpcError's details.
VERIFY = ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:43327: Tls handshake failed "
          "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:"
          "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate: OK")
HOSTNAME = ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:43327: Custom verification "
            "check failed with error: UNAUTHENTICATED: Hostname Verification Check failed.")
PLAINTEXT = ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:36039: Tls handshake failed "
             "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:SSL routines:OPENSSL_internal:"
             "WRONG_VERSION_NUMBER: Invalid certificate verification context: OK")


@pytest.mark.parametrize("details, line", [
    (VERIFY, "certificate verify failed: unable to get local issuer certificate"),
    (HOSTNAME, "certificate verify failed: Hostname mismatch, certificate is not valid for 'worker.example'."),
    (PLAINTEXT, "the peer does not speak TLS (wrong version number)"),
    ("failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:1: Connection refused", None),
    (None, None),
])
def test_tls_detail(details, line):
    assert tls_detail(details, "worker.example") == line


def test_a_tls_file_that_does_not_load_stops_startup_with_its_path(tmp_path):
    certs = make_certs(tmp_path)
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(ConfigError) as error:
        validate({"upstream": [{"host": "a", "port": 1, "tls": {"ca_file": certs.ca}},
                               {"host": "b", "port": 1, "tls": {"ca_file": missing}}]}, "pplex.json")
    assert str(error.value) == f'pplex.json: upstream[1].tls.ca_file: no such file (got "{missing}")'
    with pytest.raises(ConfigError) as error:
        validate({"upstream": [{"host": "a", "port": 1, "tls": {"cert_file": certs.ca, "key_file": certs.client_key}}]},
                 "pplex.json")
    assert str(error.value) == (f"pplex.json: upstream[0].tls.cert_file: cannot load with key_file: "
                                f'key values mismatch (got "{certs.ca}")')


def test_the_tls_key_is_optional_and_kept_as_given(tmp_path):
    certs = make_certs(tmp_path)
    config = validate({"upstream": [{"host": "a", "port": 1}, {"host": "b", "port": 1, "tls": True},
                                    {"host": "c", "port": 1, "tls": {"ca_file": certs.ca}}]})
    assert [u.get("tls") for u in config["upstream"]] == [None, True, {"ca_file": certs.ca}]
