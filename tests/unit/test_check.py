"""pplex.check's pieces that need no process: files named by settings, and redaction."""
import pytest

from pplex.check import check_files, redact
from pplex.errors import ConfigError


def test_every_file_a_setting_names_must_be_readable(tmp_path):
    present = tmp_path / "ca.pem"
    present.write_text("certificate")
    config = {"upstream": [{"host": "a", "tls": {"ca_file": str(present)}},
                           {"host": "b", "tls": {"ca_file": str(present), "key_file": str(tmp_path / "no.key")}}]}
    with pytest.raises(ConfigError) as error:
        check_files(config, "pplex.json")
    assert str(error.value) == (f"pplex.json: upstream[1].tls.key_file: cannot read {tmp_path / 'no.key'}: "
                                "No such file or directory")
    config["upstream"][1]["tls"]["key_file"] = str(present)
    check_files(config, "pplex.json")


def test_redact_hides_secret_values_only():
    config = {"management_server": {"host": "h", "token": "t"}, "plugins": {"auth_token": {"tokens": ["a", "b"]}}}
    assert redact(config) == {"management_server": {"host": "h", "token": "<redacted>"},
                              "plugins": {"auth_token": {"tokens": ["<redacted>", "<redacted>"]}}}
    assert config["management_server"]["token"] == "t"
