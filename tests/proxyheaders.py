"""A small PROXY protocol header encoder, for tests (the parser's round trips, and clients that
pretend to be a load balancer). Written from the spec (HAProxy's doc/proxy-protocol.txt), apart
from pplex/proxyproto.py on purpose: a shared mistake would pass both ways.
"""
import ipaddress
import struct

import google_crc32c

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
FAMILY = {"unspec": 0, "inet": 1, "inet6": 2, "unix": 3}
TRANSPORT = {"unspec": 0, "stream": 1, "dgram": 2}


def v1(source, destination, protocol=None):
    """`PROXY TCP4|TCP6 src dst sport dport\\r\\n`; source and destination are (address, port)."""
    if protocol is None:
        protocol = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {protocol} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


def v1_unknown(tail=""):
    return b"PROXY UNKNOWN" + (b" " + tail.encode() if tail else b"") + b"\r\n"


def tlv(kind, value):
    return struct.pack(">BH", kind, len(value)) + value


def ssl_tlv(client=0x01, verify=0, subs=()):
    """PP2_TYPE_SSL: client flags, verify, then (subtype, value) sub-TLVs."""
    return tlv(0x20, struct.pack(">BI", client, verify) + b"".join(tlv(k, v) for k, v in subs))


def v2(source=None, destination=None, family="inet", transport="stream", command="PROXY", tlvs=(),
       crc=False, version=2, block=None):
    """A v2 header. Addresses are (address, port) for inet/inet6, a path (bytes) for unix.

    `tlvs` are encoded TLVs (see `tlv`); `crc` appends a CRC32C TLV and fills it
    in; `block` replaces the address block as given (for broken headers).
    """
    if block is None:
        if family == "inet":
            block = (ipaddress.IPv4Address(source[0]).packed + ipaddress.IPv4Address(destination[0]).packed
                     + struct.pack(">HH", source[1], destination[1]))
        elif family == "inet6":
            block = (ipaddress.IPv6Address(source[0]).packed + ipaddress.IPv6Address(destination[0]).packed
                     + struct.pack(">HH", source[1], destination[1]))
        elif family == "unix":
            block = source.ljust(108, b"\x00") + destination.ljust(108, b"\x00")
        else:
            block = b""
    body = block + b"".join(tlvs)
    if crc:
        body += tlv(0x03, b"\x00\x00\x00\x00")
    command_byte = (version << 4) | {"LOCAL": 0, "PROXY": 1}.get(command, command)
    header = SIGNATURE + bytes([command_byte, (FAMILY[family] << 4) | TRANSPORT[transport]]) \
        + struct.pack(">H", len(body)) + body
    if crc:
        header = header[:-4] + struct.pack(">I", google_crc32c.value(header))
    return header
