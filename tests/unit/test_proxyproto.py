"""The PROXY protocol parser (pplex/proxyproto.py): v1 and v2 by the spec's rules, the trusted
sources, and the config keys. Fuzzing is in test_proxyproto_fuzz.py."""
import struct

import pytest

from pplex import config, limits, proxyproto
from pplex.errors import ConfigError
from pplex.proxyproto import HeaderParser, ProxyHeaderError, TrustedSources
from tests import proxyheaders as build

SRC4, DST4 = ("192.168.0.1", 56324), ("192.168.0.11", 443)
SRC6, DST6 = ("2001:db8::1", 65535), ("2001:db8::ff", 7999)


def parse(data, mode="any", **kwargs):
    return HeaderParser(mode, **kwargs).feed(data)


def refused(data, mode="any", **kwargs):
    with pytest.raises(ProxyHeaderError) as caught:
        parse(data, mode, **kwargs)
    text = str(caught.value)
    assert "\n" not in text and text
    return text


def test_v1_the_specs_example_line_and_the_bytes_after_it():
    line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    header = parse(line + b"GET / HTTP/1.1\r\n")
    assert (header.version, header.command, header.family, header.transport) == (1, "PROXY", "inet", "stream")
    assert header.source == SRC4 and header.destination == DST4
    assert header.client_address() == SRC4
    assert header.length == len(line) and header.rest == b"GET / HTTP/1.1\r\n"
    assert header.metadata() == {
        "proxy_version": "1", "proxy_command": "PROXY", "proxy_family": "inet", "proxy_transport": "stream",
        "proxy_source_addr": "192.168.0.1", "proxy_source_port": "56324",
        "proxy_destination_addr": "192.168.0.11", "proxy_destination_port": "443"}


def test_v1_tcp6_addresses_are_normalised():
    header = parse(b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::FFFF:10.0.0.1 1 2\r\n")
    assert header.source == ("2001:db8::1", 1)
    assert header.destination == ("::ffff:a00:1", 2)
    assert header.family == "inet6"


def test_v1_unknown_keeps_the_real_endpoints_and_ignores_the_rest_of_the_line():
    for line in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN whatever \xff\x00 here\r\n"):
        header = parse(line + b"x")
        assert header.family == "unspec" and header.client_address() is None
        assert header.rest == b"x" and header.length == len(line)


def test_v1_line_of_exactly_107_bytes_is_accepted_and_one_more_is_refused():
    worst = b"PROXY UNKNOWN " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n"
    assert len(worst) == 107
    assert parse(worst).length == 107
    longer = b"PROXY UNKNOWN " + b"f" * 92 + b"\r\n"
    assert len(longer) == 108
    assert "no CRLF within 107 bytes" in refused(longer)
    # Without any CRLF, the 107th byte is where it gives up: it never buffers more.
    parser = HeaderParser()
    assert parser.feed(b"PROXY UNKNOWN " + b"a" * 92) is None
    with pytest.raises(ProxyHeaderError):
        parser.feed(b"a")


@pytest.mark.parametrize("line, words", [
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\n", "lone LF"),
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\rX\r\n", "lone CR"),
    (b"PROXY TCP4 192.168.0.1  192.168.0.11 56324 443\r\n", "6 fields"),
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324\r\n", "6 fields"),
    (b"PROXY TCP4 192.168.0.01 192.168.0.11 56324 443\r\n", "not an IPv4 address"),
    (b"PROXY TCP4 192.168.0.1 192.168.0.256 56324 443\r\n", "not an IPv4 address"),
    (b"PROXY TCP4 2001:db8::1 192.168.0.11 56324 443\r\n", "not an IPv4 address"),
    (b"PROXY TCP6 192.168.0.1 2001:db8::1 56324 443\r\n", "not an IPv6 address"),
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 056324 443\r\n", "leading zeros"),
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 65536 443\r\n", "0..65535"),
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 -1 443\r\n", "byte 0x2d"),
    (b"PROXY UDP4 192.168.0.1 192.168.0.11 1 2\r\n", "TCP4, TCP6 or UNKNOWN"),
    (b"PROXY TCP5 192.168.0.1 192.168.0.11 1 2\r\n", "TCP4, TCP6 or UNKNOWN"),
    (b"PROXY \r\n", "TCP4, TCP6 or UNKNOWN"),
    (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "byte 0x25"),
    (b"proxy TCP4 1.2.3.4 1.2.3.4 1 2\r\n", "not a PROXY v1 or v2 header"),
])
def test_v1_anything_that_does_not_match_exactly_is_refused(line, words):
    assert words in refused(line)


def test_v1_is_refused_as_early_as_the_bytes_show_it():
    parser = HeaderParser()
    with pytest.raises(ProxyHeaderError, match="starts with 47"):
        parser.feed(b"G")
    with pytest.raises(ProxyHeaderError, match="already parsed"):
        parser.feed(b"ET /")
    parser = HeaderParser()
    assert parser.feed(b"PROXY TCP4 1.2") is None
    with pytest.raises(ProxyHeaderError, match="byte 0x20|byte 0x78"):
        parser.feed(b"x")


def test_byte_by_byte_gives_the_same_header_as_one_read():
    data = build.v2(SRC6, DST6, "inet6", tlvs=[build.tlv(0x02, b"example.com")], crc=True) + b"hello"
    whole = parse(data)
    parser = HeaderParser()
    results = [parser.feed(data[i:i + 1]) for i in range(whole.length)]
    assert results[:-1] == [None] * (whole.length - 1)
    header = results[-1]
    assert header.metadata() == whole.metadata() and header.rest == b""
    assert whole.rest == b"hello"


def test_v2_tcp4_and_tcp6():
    header = parse(build.v2(SRC4, DST4) + b"data")
    assert (header.version, header.command, header.family, header.transport) == (2, "PROXY", "inet", "stream")
    assert header.source == SRC4 and header.destination == DST4 and header.rest == b"data"
    header = parse(build.v2(SRC6, DST6, "inet6"))
    assert header.source == SRC6 and header.destination == DST6 and header.client_address() == SRC6
    udp = parse(build.v2(SRC4, DST4, transport="dgram"))
    assert udp.transport == "dgram" and udp.metadata()["proxy_transport"] == "dgram"


def test_v2_unix_paths_including_an_abstract_name():
    header = parse(build.v2(b"/run/lb.sock", b"\x00abstract", "unix"))
    assert header.source == "/run/lb.sock" and header.destination == "@abstract"
    assert header.client_address() is None  # not an IP address: the socket's own is kept
    assert header.metadata()["proxy_source_addr"] == "/run/lb.sock"
    assert "proxy_source_port" not in header.metadata()


def test_v2_local_uses_the_real_endpoints_and_skips_its_block_unread():
    # Whatever follows LOCAL (even a bad family byte or broken TLVs) is skipped: the spec says accept it.
    data = build.v2(command="LOCAL", family="unspec", block=b"\xff" * 20) + b"after"
    header = parse(data)
    assert header.command == "LOCAL" and header.client_address() is None and header.rest == b"after"
    raw = bytearray(build.v2(command="LOCAL", family="unspec"))
    raw[13] = 0xFF
    assert parse(bytes(raw)).command == "LOCAL"


def test_v2_unspec_family_or_transport_ignores_the_addresses():
    for family, transport in (("unspec", "unspec"), ("inet", "unspec"), ("unspec", "stream")):
        header = parse(build.v2(family=family, transport=transport, block=b"\x01" * 12) + b"z")
        assert header.client_address() is None and header.rest == b"z"


def test_v2_tlvs_by_name():
    tlvs = [build.tlv(0x01, b"h2"), build.tlv(0x02, b"game.example.com"), build.tlv(0x04, b"\x00" * 5),
            build.tlv(0x05, b"conn-42"), build.tlv(0x30, b"blue"), build.tlv(0xEA, b"\x01vpce-123"),
            build.ssl_tlv(0x07, 0, [(0x21, b"TLSv1.3"), (0x22, b"client.example"), (0x23, b"TLS_AES_128_GCM_SHA256"),
                                    (0x24, b"RSA-SHA256"), (0x25, b"RSA2048"), (0x99, b"ignored")])]
    meta = parse(build.v2(SRC4, DST4, tlvs=tlvs, crc=True)).metadata()
    assert meta == {
        "proxy_version": "2", "proxy_command": "PROXY", "proxy_family": "inet", "proxy_transport": "stream",
        "proxy_source_addr": "192.168.0.1", "proxy_source_port": "56324",
        "proxy_destination_addr": "192.168.0.11", "proxy_destination_port": "443",
        "proxy_alpn": "h2", "proxy_authority": "game.example.com", "proxy_unique_id": "conn-42",
        "proxy_netns": "blue", "proxy_tlv_0xea": "01767063652d313233",
        "proxy_ssl": "true", "proxy_ssl_cert_conn": "true", "proxy_ssl_cert_sess": "true", "proxy_ssl_verify": "0",
        "proxy_ssl_version": "TLSv1.3", "proxy_ssl_cn": "client.example", "proxy_ssl_cipher": "TLS_AES_128_GCM_SHA256",
        "proxy_ssl_sig_alg": "RSA-SHA256", "proxy_ssl_key_alg": "RSA2048"}


def test_v2_text_tlvs_that_are_not_utf8_are_escaped_not_refused():
    meta = parse(build.v2(SRC4, DST4, tlvs=[build.tlv(0x02, b"bad\xff\xfe")])).metadata()
    assert meta["proxy_authority"] == "bad\\xff\\xfe"
    meta["proxy_authority"].encode("utf-8")  # fits a proto3 string


def test_v2_crc32c_is_verified():
    good = build.v2(SRC4, DST4, tlvs=[build.tlv(0x02, b"a.example")], crc=True)
    assert parse(good).tlvs == {"authority": "a.example"}
    for index in (16, 27, len(good) - 12, len(good) - 1):  # an address, a port, a TLV value, the sum itself
        broken = bytearray(good)
        broken[index] ^= 0x01
        assert "CRC32C mismatch" in refused(bytes(broken))
    assert "must be 4 bytes" in refused(build.v2(SRC4, DST4, tlvs=[build.tlv(0x03, b"\x00" * 3)]))
    twice = build.v2(SRC4, DST4, tlvs=[build.tlv(0x03, b"\x00" * 4)], crc=True)
    assert "two CRC32C" in refused(twice)


@pytest.mark.parametrize("data, words", [
    (build.v2(SRC4, DST4, version=1), "version must be 2"),
    (build.v2(SRC4, DST4, command=2), "command must be LOCAL"),
    (build.v2(family="inet", block=b"\x00" * 11), "needs 12 address bytes"),
    (build.v2(family="inet6", block=b"\x00" * 12), "needs 36 address bytes"),
    (build.v2(SRC4, DST4, tlvs=[b"\x02\x00"]), "too short for a TLV"),
    (build.v2(SRC4, DST4, tlvs=[b"\x02\x00\x09abc"]), "overruns the header by 6"),
    (build.v2(SRC4, DST4, tlvs=[build.tlv(0x05, b"u" * 129)]), "over 128"),
    (build.v2(SRC4, DST4, tlvs=[build.tlv(0x20, b"\x01\x00\x00")]), "at least 5 bytes"),
    (build.v2(SRC4, DST4, tlvs=[build.tlv(0x20, b"\x01\x00\x00\x00\x00\x21\x00\x05ab")]), "SSL TLV"),
])
def test_v2_broken_headers_are_refused(data, words):
    assert words in refused(data)


def test_v2_family_and_transport_values_outside_the_spec_are_refused():
    raw = bytearray(build.v2(SRC4, DST4))
    for byte in (0x41, 0x13, 0xF1):
        raw[13] = byte
        assert "not defined" in refused(bytes(raw))


def test_v2_version_and_command_are_refused_before_the_length_arrives():
    parser = HeaderParser()
    assert parser.feed(build.SIGNATURE) is None
    with pytest.raises(ProxyHeaderError, match="version must be 2"):
        parser.feed(b"\x11")


def test_v2_length_cap_is_checked_from_the_fixed_part_alone():
    big = build.v2(SRC4, DST4, tlvs=[build.tlv(0x04, b"\x00" * 5000)])
    parser = HeaderParser()
    with pytest.raises(ProxyHeaderError, match="5031 bytes is over the limit of 4096"):
        parser.feed(big[:16])
    assert parse(big, max_v2_bytes=65551).length == len(big)
    with pytest.raises(ValueError):
        HeaderParser(max_v2_bytes=15)


def test_modes_accept_only_their_version():
    line, binary = build.v1(SRC4, DST4), build.v2(SRC4, DST4)
    assert parse(line, "v1").version == 1 and parse(binary, "v2").version == 2
    assert "not a PROXY v2 header" in refused(line, "v2")
    assert "not a PROXY v1 line" in refused(binary, "v1")
    with pytest.raises(ValueError):
        HeaderParser("off")


def test_no_bytes_is_need_more():
    assert HeaderParser().feed(b"") is None


# -- trusted sources ----------------------------------------------------------------------------

def test_trusted_sources_match_networks_hosts_and_mapped_ipv4():
    trusted = TrustedSources(["10.0.0.0/8", "192.168.1.7/32", "fd00::/8"])
    assert trusted.trusts("10.200.3.4") and trusted.trusts("192.168.1.7")
    assert trusted.trusts("::ffff:10.1.2.3")  # an IPv4 balancer seen by a dual-stack listener
    assert trusted.trusts("fd12::1") and trusted.trusts("fd12::1%eth0")
    for host in ("11.0.0.1", "192.168.1.8", "fe80::1", "::ffff:11.0.0.1", "/tmp/sock", "", "lb.example", None):
        assert not trusted.trusts(host), host
    assert not TrustedSources([]).trusts("127.0.0.1")


def test_cidr_list_normalises_and_names_the_bad_entry():
    assert proxyproto.cidr_list([" 10.1.2.3/8 ", "::1", "127.0.0.1"]) == ["10.0.0.0/8", "::1/128", "127.0.0.1/32"]
    for bad, words in (("10.0.0.0/33", "not an IPv4 or IPv6 network"), (7, "expected a CIDR string")):
        with pytest.raises(Exception) as caught:
            proxyproto.cidr_list(["10.0.0.0/8", bad])
        assert words in str(caught.value) and caught.value.path == [1]
    with pytest.raises(Exception, match="at most 4096"):
        proxyproto.cidr_list(["10.0.0.0/8"] * 4097)


# -- config keys --------------------------------------------------------------------------------

def test_config_defaults_are_off_no_trusted_networks_and_a_5_s_deadline():
    server = config.validate({})["server"]
    assert server["proxy_protocol"] == "off" and server["proxy_protocol_from"] == []
    assert server["proxy_protocol_timeout"] == 5
    assert limits.by_path("server.proxy_protocol_timeout") is limits.PROXY_PROTOCOL_TIMEOUT


def test_config_accepts_each_mode_with_trusted_networks():
    for mode in ("v1", "v2", "any"):
        server = config.validate({"server": {"proxy_protocol": mode, "proxy_protocol_from": ["10.0.0.0/8"],
                                             "proxy_protocol_timeout": 3.5}})["server"]
        assert server["proxy_protocol"] == mode and server["proxy_protocol_timeout"] == 3.5


@pytest.mark.parametrize("server, line", [
    ({"proxy_protocol": "v3"}, "x: server.proxy_protocol: must be one of off, v1, v2, any (got \"v3\")"),
    ({"proxy_protocol": True}, "x: server.proxy_protocol: must be one of off, v1, v2, any (got true)"),
    ({"proxy_protocol": "any"}, "x: server.proxy_protocol_from: must list the load balancers' networks when "
                                "server.proxy_protocol is any (a PROXY header from anyone else is refused)"),
    ({"proxy_protocol_from": ["10.0.0.0/8", "nope"]},
     "x: server.proxy_protocol_from[1]: not an IPv4 or IPv6 network like \"10.0.0.0/8\" or \"fd00::/8\" (got \"nope\")"),
    ({"proxy_protocol_from": "10.0.0.0/8"},
     "x: server.proxy_protocol_from: expected a list of CIDRs like [\"10.0.0.0/8\"] (got \"10.0.0.0/8\")"),
    ({"proxy_protocol_timeout": 0}, "x: server.proxy_protocol_timeout: must be greater than 0 and at most 300 (got 0)"),
    ({"proxy_protocol_timeout": float("inf")}, "x: server.proxy_protocol_timeout: must be a finite number (got Infinity)"),
])
def test_config_errors_name_the_path_in_one_line(server, line):
    with pytest.raises(ConfigError) as caught:
        config.validate({"server": server}, "x")
    assert str(caught.value) == line


def test_struct_sizes_match_the_spec():
    assert len(build.v2(SRC4, DST4)) == 16 + 12 and len(build.v2(SRC6, DST6, "inet6")) == 16 + 36
    assert len(build.v2(b"/a", b"/b", "unix")) == 16 + 216
    assert struct.unpack(">H", build.v2(SRC4, DST4)[14:16]) == (12,)
