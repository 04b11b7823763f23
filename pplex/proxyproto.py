"""The PROXY protocol header (v1 and v2) that a load balancer puts before a client's bytes.

A pure parser, no I/O: the listener feeds it the first bytes of a connection
and gets back either "need more", the parsed header with the bytes that follow
it (the client's own data, never read into), or `ProxyHeaderError` with a
one-line reason. Also here: the trusted-source list (`server.proxy_protocol_from`)
and the config validators for both keys.

    parser = HeaderParser("any")
    header = parser.feed(first_bytes)      # None: feed more (until the header deadline)
    header.client_address()                # ("203.0.113.7", 51234), or None: use the socket's
    header.metadata()                      # {"proxy_version": "2", "proxy_source_addr": ...}
    header.rest                            # the client's bytes after the header

Wire facts are from the PROXY protocol specification (HAProxy's
doc/proxy-protocol.txt, versions 1 and 2):

- v1: one US-ASCII line `PROXY TCP4|TCP6|UNKNOWN src dst sport dport\\r\\n`,
  at most 107 bytes with the CRLF; exactly one space between fields;
  no leading zeros in IPv4 octets or ports; for UNKNOWN the rest of the line
  is ignored. A lone CR or LF does not end the line.
- v2: the 12-byte signature `\\r\\n\\r\\n\\0\\r\\nQUIT\\n`, a version/command
  byte (version 2; command 0 LOCAL, 1 PROXY), a family/transport byte
  (family 0 UNSPEC, 1 INET, 2 INET6, 3 UNIX; transport 0 UNSPEC, 1 STREAM,
  2 DGRAM), a big-endian 16-bit length of what follows, then the addresses
  (12, 36 or 216 bytes) and type-length-value fields (TLVs). LOCAL means
  "use the real endpoints" and its block is skipped unread; so is the block
  of an UNSPEC family or transport. A CRC32C TLV is checked over the whole
  header with its own value zeroed (RFC 4960 appendix B's CRC32c).

Limits: a v1 line is 107 bytes at most (the spec's); a v2 header is
`MAX_V2_BYTES` at most (ours: the spec allows 65,551, no sane sender needs a
tenth of it, and it is memory held for a client that has not said anything yet).
"""
import ipaddress
import struct

import google_crc32c
import voluptuous as vol

V1_MAX_BYTES = 107             # the spec's worst case, "PROXY UNKNOWN <v6> <v6> 65535 65535\r\n"
MAX_V2_BYTES = 4096            # ours: 16-byte fixed part + addresses + TLVs
MAX_TRUSTED_NETWORKS = 4096    # entries in server.proxy_protocol_from
UNIQUE_ID_MAX_BYTES = 128      # the spec's bound for PP2_TYPE_UNIQUE_ID
MODES = ("off", "v1", "v2", "any")

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED = struct.Struct(">12sBBH")

FAMILIES = {0: "unspec", 1: "inet", 2: "inet6", 3: "unix"}
TRANSPORTS = {0: "unspec", 1: "stream", 2: "dgram"}
_ADDRESS_BYTES = {1: 12, 2: 36, 3: 216}

# PP2_TYPE_* and PP2_SUBTYPE_SSL_*, by the metadata name each gets (proxy_<name>).
TLV_ALPN, TLV_AUTHORITY, TLV_CRC32C, TLV_NOOP, TLV_UNIQUE_ID = 0x01, 0x02, 0x03, 0x04, 0x05
TLV_SSL, TLV_NETNS = 0x20, 0x30
TLV_NAMES = {TLV_ALPN: "alpn", TLV_AUTHORITY: "authority", TLV_UNIQUE_ID: "unique_id", TLV_NETNS: "netns"}
SSL_SUBTYPES = {0x21: "ssl_version", 0x22: "ssl_cn", 0x23: "ssl_cipher", 0x24: "ssl_sig_alg",
                0x25: "ssl_key_alg"}
SSL_CLIENT_FLAGS = {0x01: "ssl", 0x02: "ssl_cert_conn", 0x04: "ssl_cert_sess"}  # PP2_CLIENT_*


class ProxyHeaderError(ValueError):
    """The bytes are not a valid PROXY header (of the accepted versions); `str()` is a one-line reason."""


class Header:
    """A parsed header.

    `version` 1 or 2; `command` "PROXY" or "LOCAL" (v1 is always PROXY);
    `family` "inet", "inet6", "unix" or "unspec"; `transport` "stream",
    "dgram" or "unspec"; `source` / `destination` an (address, port) pair for
    inet and inet6, a path (str) for unix, None when the header carries no
    usable address; `tlvs` name -> text (see `metadata`); `length` the bytes
    the header took; `rest` the bytes fed after it.
    """

    __slots__ = ("version", "command", "family", "transport", "source", "destination", "tlvs",
                 "length", "rest")

    def __init__(self, version, command, family, transport, source=None, destination=None, tlvs=None,
                 length=0, rest=b""):
        self.version = version
        self.command = command
        self.family = family
        self.transport = transport
        self.source = source
        self.destination = destination
        self.tlvs = tlvs or {}
        self.length = length
        self.rest = rest

    def __repr__(self):
        return (f"<Header v{self.version} {self.command} {self.family}/{self.transport} "
                f"{self.source} -> {self.destination} {self.tlvs}>")

    def client_address(self):
        """The client's (address, port) to use instead of the socket's, or None to keep the socket's.

        None for LOCAL, for UNSPEC and v1 UNKNOWN, and for unix sources (not an
        IP address: auth rules and logs keep the load balancer's).
        """
        if self.command == "PROXY" and self.family in ("inet", "inet6") and self.source is not None:
            return self.source
        return None

    def metadata(self):
        """The header's facts as CONNECTED metadata: `proxy_*` names -> strings.

        proxy_version, proxy_command, proxy_family, proxy_transport; when the
        header carries addresses: proxy_source_addr, proxy_source_port,
        proxy_destination_addr, proxy_destination_port (unix: addr is the path,
        no ports); then one entry per TLV: proxy_alpn, proxy_authority,
        proxy_unique_id, proxy_netns, proxy_ssl / proxy_ssl_cert_conn /
        proxy_ssl_cert_sess ("true"/"false"), proxy_ssl_verify (decimal, 0 =
        verified), proxy_ssl_version, proxy_ssl_cn, proxy_ssl_cipher,
        proxy_ssl_sig_alg, proxy_ssl_key_alg, and proxy_tlv_0xNN (hex value)
        for any other type. Text values are UTF-8, undecodable bytes as \\xNN.
        """
        facts = {"proxy_version": str(self.version), "proxy_command": self.command,
                 "proxy_family": self.family, "proxy_transport": self.transport}
        for side, value in (("source", self.source), ("destination", self.destination)):
            if isinstance(value, tuple):
                facts[f"proxy_{side}_addr"] = value[0]
                facts[f"proxy_{side}_port"] = str(value[1])
            elif value is not None:
                facts[f"proxy_{side}_addr"] = value
        for name, value in self.tlvs.items():
            facts["proxy_" + name] = value
        return facts


class HeaderParser:
    """Incremental parser of one connection's PROXY header.

    :param mode: "v1", "v2" or "any" (which versions are accepted).
    :param max_v2_bytes: the largest v2 header accepted (16 to 65,551).

    `feed(data)` returns None while the header is incomplete, then the
    `Header` (with `rest`, the bytes after it). It raises `ProxyHeaderError`
    as soon as the bytes cannot be a valid header, and for any call after
    the header was returned. It holds at most the header's bytes plus the
    last chunk fed.
    """

    def __init__(self, mode="any", max_v2_bytes=MAX_V2_BYTES):
        if mode not in ("v1", "v2", "any"):
            raise ValueError(f"mode must be v1, v2 or any (got {mode!r})")
        if not 16 <= max_v2_bytes <= 16 + 0xFFFF:
            raise ValueError(f"max_v2_bytes must be 16..65551 (got {max_v2_bytes})")
        self.mode = mode
        self.max_v2_bytes = max_v2_bytes
        self._buf = b""
        self._done = False

    def feed(self, data):
        if self._done:
            raise ProxyHeaderError("the PROXY header was already parsed")
        buf = self._buf = self._buf + bytes(data)
        try:
            if self.mode != "v2" and buf[:6] == V1_PREFIX[:len(buf)]:
                header = _parse_v1(buf)
            elif self.mode != "v1" and buf[:12] == V2_SIGNATURE[:len(buf)]:
                header = _parse_v2(buf, self.max_v2_bytes)
            else:
                raise ProxyHeaderError(_not_a_header(buf, self.mode))
        except ProxyHeaderError:
            self._done = True
            self._buf = b""
            raise
        if header is not None:
            self._done = True
            self._buf = b""
        return header


def _not_a_header(buf, mode):
    wanted = {"v1": "a PROXY v1 line", "v2": "a PROXY v2 header", "any": "a PROXY v1 or v2 header"}[mode]
    return f"not {wanted}: starts with {_show(buf[:16])}"


def _show(data):
    """Bytes from outside, for a log line: hex, short."""
    return data.hex(" ") if data else "(nothing)"


# -- v1 ------------------------------------------------------------------------------------

_V1_CHARS = frozenset(b"PROXY TCP46UNKW0123456789abcdefABCDEF.:\r\n")


def _parse_v1(buf):
    end = buf.find(b"\r\n", 0, V1_MAX_BYTES)
    line = buf[:end] if end >= 0 else buf[:V1_MAX_BYTES]
    # Reject early: a character no header line can hold, or a lone CR or LF.
    for index, byte in enumerate(line):
        if byte == 0x0A or (byte == 0x0D and index + 1 < len(buf) and buf[index + 1] != 0x0A):
            raise ProxyHeaderError(f"PROXY v1 line ended by a lone {'LF' if byte == 0x0A else 'CR'} "
                                   f"at byte {index}")
        if byte not in _V1_CHARS and not line.startswith(b"PROXY UNKNOWN"):
            raise ProxyHeaderError(f"PROXY v1 line holds byte 0x{byte:02x} at {index}")
    if end < 0:
        if len(buf) >= V1_MAX_BYTES:
            raise ProxyHeaderError(f"PROXY v1 line has no CRLF within {V1_MAX_BYTES} bytes")
        return None
    rest = buf[end + 2:]
    length = end + 2
    fields = line.split(b" ")
    protocol = fields[1] if len(fields) > 1 else b""
    if protocol == b"UNKNOWN":
        # "the receiver must ignore anything presented before the CRLF"
        return Header(1, "PROXY", "unspec", "unspec", length=length, rest=rest)
    if protocol not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError(f"PROXY v1 protocol must be TCP4, TCP6 or UNKNOWN (got {_text(protocol)!r})")
    if len(fields) != 6:
        raise ProxyHeaderError(f"PROXY v1 {protocol.decode()} line must have 6 fields separated by single "
                               f"spaces (got {len(fields)})")
    version = 4 if protocol == b"TCP4" else 6
    source = (_v1_address(fields[2], version, "source"), _v1_port(fields[4], "source"))
    destination = (_v1_address(fields[3], version, "destination"), _v1_port(fields[5], "destination"))
    family = "inet" if version == 4 else "inet6"
    return Header(1, "PROXY", family, "stream", source, destination, length=length, rest=rest)


def _text(data):
    return data.decode("ascii", "backslashreplace")


def _v1_address(field, version, side):
    text = _text(field)
    try:
        address = ipaddress.IPv4Address(text) if version == 4 else ipaddress.IPv6Address(text)
    except ValueError:
        raise ProxyHeaderError(f"PROXY v1 {side} address is not an IPv{version} address: {text[:45]!r}") from None
    return str(address)


def _v1_port(field, side):
    if not field or len(field) > 5 or not field.isdigit() or (field[:1] == b"0" and len(field) > 1):
        raise ProxyHeaderError(f"PROXY v1 {side} port must be 0..65535 without leading zeros "
                               f"(got {_text(field)[:8]!r})")
    port = int(field)
    if port > 65535:
        raise ProxyHeaderError(f"PROXY v1 {side} port must be 0..65535 (got {port})")
    return port


# -- v2 ------------------------------------------------------------------------------------

def _parse_v2(buf, max_bytes):
    if len(buf) < 16:
        # Version and command can be refused before the length arrives.
        if len(buf) >= 13:
            _v2_command(buf[12])
        return None
    _, version_command, family_transport, block = _V2_FIXED.unpack_from(buf)
    command = _v2_command(version_command)
    total = 16 + block
    if total > max_bytes:
        raise ProxyHeaderError(f"PROXY v2 header of {total} bytes is over the limit of {max_bytes}")
    if len(buf) < total:
        return None
    header_bytes, rest = buf[:total], buf[total:]
    if command == "LOCAL":
        # "must use the real connection endpoints and discard the protocol block including the family"
        return Header(2, "LOCAL", "unspec", "unspec", length=total, rest=rest)
    family, transport = family_transport >> 4, family_transport & 0x0F
    if family not in FAMILIES or transport not in TRANSPORTS:
        raise ProxyHeaderError(f"PROXY v2 family/transport byte 0x{family_transport:02x} is not defined")
    if family == 0 or transport == 0:
        # UNSPEC: "the receiver should ignore address information"; where the
        # addresses end is unknown, so the TLVs that may follow are skipped too.
        return Header(2, "PROXY", FAMILIES[family], TRANSPORTS[transport], length=total, rest=rest)
    need = _ADDRESS_BYTES[family]
    if block < need:
        raise ProxyHeaderError(f"PROXY v2 {FAMILIES[family]} header needs {need} address bytes "
                               f"(its length says {block})")
    source, destination = _v2_addresses(header_bytes, family)
    tlvs = _v2_tlvs(header_bytes, 16 + need)
    return Header(2, "PROXY", FAMILIES[family], TRANSPORTS[transport], source, destination, tlvs,
                  length=total, rest=rest)


def _v2_command(byte):
    if byte >> 4 != 2:
        raise ProxyHeaderError(f"PROXY v2 version must be 2 (got {byte >> 4})")
    command = byte & 0x0F
    if command > 1:
        raise ProxyHeaderError(f"PROXY v2 command must be LOCAL (0) or PROXY (1) (got {command})")
    return ("LOCAL", "PROXY")[command]


def _v2_addresses(data, family):
    if family == 1:
        return ((str(ipaddress.IPv4Address(data[16:20])), int.from_bytes(data[24:26], "big")),
                (str(ipaddress.IPv4Address(data[20:24])), int.from_bytes(data[26:28], "big")))
    if family == 2:
        return ((str(ipaddress.IPv6Address(data[16:32])), int.from_bytes(data[48:50], "big")),
                (str(ipaddress.IPv6Address(data[32:48])), int.from_bytes(data[50:52], "big")))
    return _unix_path(data[16:124]), _unix_path(data[124:232])


def _unix_path(raw):
    """A sockaddr_un path: up to the first NUL; an abstract name (leading NUL) as "@name"."""
    if raw[:1] == b"\x00":
        name = raw[1:].rstrip(b"\x00")
        return "@" + _utf8(name) if name else ""
    return _utf8(raw.split(b"\x00", 1)[0])


def _utf8(data):
    return data.decode("utf-8", "backslashreplace")


def _tlv_items(data, start, end, where):
    """(type, value start, value end) of each TLV in data[start:end]."""
    offset = start
    while offset < end:
        if end - offset < 3:
            raise ProxyHeaderError(f"PROXY v2 {where} ends with {end - offset} byte(s), too short for a TLV")
        kind = data[offset]
        length = (data[offset + 1] << 8) | data[offset + 2]
        value = offset + 3
        if value + length > end:
            raise ProxyHeaderError(f"PROXY v2 {where} TLV 0x{kind:02x} of {length} bytes overruns the header "
                                   f"by {value + length - end}")
        yield kind, value, value + length
        offset = value + length


def _v2_tlvs(data, start):
    tlvs = {}
    crc_at = None
    for kind, begin, end in _tlv_items(data, start, len(data), "header"):
        value = data[begin:end]
        if kind == TLV_CRC32C:
            if end - begin != 4:
                raise ProxyHeaderError(f"PROXY v2 CRC32C TLV must be 4 bytes (got {end - begin})")
            if crc_at is not None:
                raise ProxyHeaderError("PROXY v2 header has two CRC32C TLVs")
            crc_at = begin
        elif kind == TLV_NOOP:
            continue
        elif kind == TLV_UNIQUE_ID and end - begin > UNIQUE_ID_MAX_BYTES:
            raise ProxyHeaderError(f"PROXY v2 UNIQUE_ID TLV is {end - begin} bytes, over {UNIQUE_ID_MAX_BYTES}")
        elif kind == TLV_SSL:
            _ssl_tlv(data, begin, end, tlvs)
        elif kind in TLV_NAMES:
            tlvs.setdefault(TLV_NAMES[kind], _utf8(value))
        else:
            tlvs.setdefault(f"tlv_0x{kind:02x}", value.hex())
    if crc_at is not None:
        expected = int.from_bytes(data[crc_at:crc_at + 4], "big")
        zeroed = data[:crc_at] + b"\x00\x00\x00\x00" + data[crc_at + 4:]
        actual = google_crc32c.value(zeroed)
        if actual != expected:
            raise ProxyHeaderError(f"PROXY v2 CRC32C mismatch: header says 0x{expected:08x}, "
                                   f"bytes give 0x{actual:08x}")
    return tlvs


def _ssl_tlv(data, begin, end, tlvs):
    if end - begin < 5:
        raise ProxyHeaderError(f"PROXY v2 SSL TLV must be at least 5 bytes (got {end - begin})")
    if "ssl" in tlvs:
        return  # the first one counts
    client = data[begin]
    for flag, name in SSL_CLIENT_FLAGS.items():
        tlvs[name] = "true" if client & flag else "false"
    tlvs["ssl_verify"] = str(int.from_bytes(data[begin + 1:begin + 5], "big"))
    for kind, sub_begin, sub_end in _tlv_items(data, begin + 5, end, "SSL"):
        name = SSL_SUBTYPES.get(kind)
        if name is not None:
            tlvs.setdefault(name, _utf8(data[sub_begin:sub_end]))


# -- trusted sources and config ---------------------------------------------------------------

class TrustedSources:
    """The networks a PROXY header is accepted from (`server.proxy_protocol_from`).

    :param cidrs: strings as `cidr_list` returns them ("10.0.0.0/8", "::1").
    `trusts(host)` is True when the socket's peer address is in one of them;
    an IPv4 client seen as `::ffff:a.b.c.d` by a dual-stack listener counts as
    `a.b.c.d`. Anything that is not an IP address (a unix socket) is not trusted.
    """

    def __init__(self, cidrs):
        self.networks = tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)

    def trusts(self, host):
        if not isinstance(host, str):
            return False
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        mapped = getattr(address, "ipv4_mapped", None)
        for network in self.networks:
            if address in network or (mapped is not None and mapped in network):
                return True
        return False


def cidr(value):
    """Validator: one network, "10.0.0.0/8" or a bare address (one host); host bits may be set."""
    if not isinstance(value, str):
        raise vol.Invalid("expected a CIDR string like \"10.0.0.0/8\"")
    text = value.strip()
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise vol.Invalid("not an IPv4 or IPv6 network like \"10.0.0.0/8\" or \"fd00::/8\"") from None
    return str(network)


def cidr_list(value):
    """Validator for `server.proxy_protocol_from`: a list of `cidr`s (at most MAX_TRUSTED_NETWORKS)."""
    if not isinstance(value, list):
        raise vol.Invalid("expected a list of CIDRs like [\"10.0.0.0/8\"]")
    if len(value) > MAX_TRUSTED_NETWORKS:
        raise vol.Invalid(f"at most {MAX_TRUSTED_NETWORKS} networks (got {len(value)})")
    networks = []
    for index, item in enumerate(value):
        try:
            networks.append(cidr(item))
        except vol.Invalid as error:
            raise vol.Invalid(error.error_message, path=[index]) from None
    return networks


def mode(value):
    """Validator for `server.proxy_protocol`: off, v1, v2 or any."""
    if value not in MODES:
        raise vol.Invalid(f"must be one of {', '.join(MODES)}")
    return value


def check_server(server):
    """Whole-section check: a PROXY header needs someone to trust."""
    if server.get("proxy_protocol", "off") != "off" and not server.get("proxy_protocol_from"):
        raise vol.Invalid("must list the load balancers' networks when server.proxy_protocol is "
                          f"{server['proxy_protocol']} (a PROXY header from anyone else is refused)",
                          path=["proxy_protocol_from"])
    return server
