"""Fuzzing the PROXY header parser: it parses bytes from anyone who can open a TCP connection.

Properties, over random bytes, random headers built by tests/proxyheaders.py,
mutations of those and of the seed corpus (tests/data/proxyproto_corpus.json),
each fed in random chunks:

- it never raises anything but `ProxyHeaderError`;
- it never reads past the header: `length` + `rest` is exactly what was fed,
  and `rest` is the bytes after the header, untouched;
- feeding in chunks gives the same answer as feeding at once;
- a header built from facts parses back to those facts;
- every metadata value is a string a proto3 `string` field can carry.

Bounded so the suite stays fast (a few seconds); `PPLEX_FUZZ_EXAMPLES=100000`
runs a long campaign. In CI (`CI` set) the examples are derandomized, so a run
is reproducible; locally each run explores new ones.
"""
import ipaddress
import json
import os

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pplex.proxyproto import MAX_V2_BYTES, HeaderParser, ProxyHeaderError
from tests import proxyheaders as build
from tests.helpers import ROOT

CORPUS = json.load(open(os.path.join(ROOT, "tests", "data", "proxyproto_corpus.json")))
VALID = [bytes.fromhex(entry["hex"]) for entry in CORPUS["valid"]]
INVALID = [bytes.fromhex(entry["hex"]) for entry in CORPUS["invalid"]]

FUZZ = settings(max_examples=int(os.environ.get("PPLEX_FUZZ_EXAMPLES", "150")), deadline=None, database=None,
                derandomize=bool(os.environ.get("CI")), suppress_health_check=[HealthCheck.too_slow])


def feed_in_chunks(data, cuts, mode="any"):
    """Feed `data` cut at `cuts`: ("header", Header, bytes fed), ("error", reason, fed) or ("more", None, fed)."""
    parser = HeaderParser(mode)
    points = sorted({c % (len(data) + 1) for c in cuts} | {len(data)})
    start = 0
    for end in points:
        try:
            header = parser.feed(data[start:end])
        except ProxyHeaderError as error:
            return "error", str(error), end
        if header is not None:
            return "header", header, end
        start = end
    return "more", None, len(data)


def check_invariants(data, outcome):
    kind, value, fed = outcome
    if kind == "error":
        assert value and "\n" not in value
        return
    if kind == "more":
        # Waiting is only allowed while the bytes can still become a header within the limits.
        assert fed <= MAX_V2_BYTES
        return
    header = value
    assert 0 < header.length <= fed
    assert header.rest == data[header.length:fed]   # never read into the client's own bytes
    assert header.length <= (107 if header.version == 1 else MAX_V2_BYTES)
    for key, text in header.metadata().items():
        assert key.startswith("proxy_") and isinstance(text, str)
        text.encode("utf-8")  # strict: a proto3 string field refuses lone surrogates


def same_answer(a, b):
    if a[0] != b[0]:
        return False
    if a[0] == "header":
        return a[1].metadata() == b[1].metadata() and a[1].length == b[1].length
    return True


cuts = st.lists(st.integers(min_value=0, max_value=5000), max_size=8)
prefixes = st.sampled_from([b"", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN", build.SIGNATURE,
                            build.SIGNATURE + b"\x21", build.SIGNATURE + b"\x21\x11\x00\x0c",
                            build.SIGNATURE + b"\x21\x21\x00\x24", build.SIGNATURE + b"\x21\x31\x00\xd8"])


@FUZZ
@given(prefix=prefixes, tail=st.binary(max_size=400), cuts=cuts)
@example(prefix=b"", tail=b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff", cuts=[])
def test_random_bytes_never_raise_anything_else_and_never_read_past_the_header(prefix, tail, cuts):
    data = prefix + tail
    outcome = feed_in_chunks(data, cuts)
    check_invariants(data, outcome)
    if outcome[0] != "more" or len(data) == 0:
        assert same_answer(outcome, feed_in_chunks(data[:outcome[2]], []))


ports = st.integers(min_value=0, max_value=65535)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
payloads = st.binary(max_size=64)


@FUZZ
@given(six=st.booleans(), addresses=st.data(), sport=ports, dport=ports, payload=payloads, cuts=cuts)
def test_v1_headers_round_trip(six, addresses, sport, dport, payload, cuts):
    strategy = ipv6 if six else ipv4
    source, destination = addresses.draw(strategy), addresses.draw(strategy)
    line = build.v1((source, sport), (destination, dport))
    kind, header, fed = feed_in_chunks(line + payload, cuts)
    assert kind == "header", header
    assert header.version == 1 and header.family == ("inet6" if six else "inet")
    assert header.source == (str(ipaddress.ip_address(source)), sport)
    assert header.destination == (str(ipaddress.ip_address(destination)), dport)
    assert header.length == len(line) and header.rest == (line + payload)[len(line):fed]


text_values = st.text(max_size=40).map(lambda t: t.encode("utf-8"))
named_tlvs = st.lists(st.one_of(
    st.tuples(st.just(0x01), st.binary(max_size=20)),          # ALPN
    st.tuples(st.just(0x02), text_values),                     # AUTHORITY
    st.tuples(st.just(0x04), st.binary(max_size=10)),          # NOOP
    st.tuples(st.just(0x05), st.binary(max_size=128)),         # UNIQUE_ID
    st.tuples(st.just(0x30), text_values),                     # NETNS
    st.tuples(st.integers(min_value=0xE0, max_value=0xF7), st.binary(max_size=30)),
), max_size=6)
ssl = st.one_of(st.none(), st.tuples(st.integers(min_value=0, max_value=7), st.integers(min_value=0, max_value=2**32 - 1),
                                     st.lists(st.tuples(st.integers(min_value=0x21, max_value=0x25), text_values),
                                              max_size=5)))


def expected_tlvs(tlvs, ssl_value):
    """What the parser should report, worked out here from the spec: first of each kind wins."""
    names = {0x01: "alpn", 0x02: "authority", 0x05: "unique_id", 0x30: "netns"}
    facts = {}
    for kind, value in tlvs:
        if kind == 0x04:
            continue
        if kind in names:
            facts.setdefault(names[kind], value.decode("utf-8", "backslashreplace"))
        else:
            facts.setdefault(f"tlv_0x{kind:02x}", value.hex())
    if ssl_value is not None:
        client, verify, subs = ssl_value
        facts.update(ssl=str(bool(client & 1)).lower(), ssl_cert_conn=str(bool(client & 2)).lower(),
                     ssl_cert_sess=str(bool(client & 4)).lower(), ssl_verify=str(verify))
        subnames = {0x21: "ssl_version", 0x22: "ssl_cn", 0x23: "ssl_cipher", 0x24: "ssl_sig_alg", 0x25: "ssl_key_alg"}
        for kind, value in subs:
            facts.setdefault(subnames[kind], value.decode("utf-8"))
    return facts


@FUZZ
@given(family=st.sampled_from(["inet", "inet6", "unix"]), transport=st.sampled_from(["stream", "dgram"]),
       addresses=st.data(), sport=ports, dport=ports, tlvs=named_tlvs, ssl_value=ssl, crc=st.booleans(),
       payload=payloads, cuts=cuts)
def test_v2_headers_round_trip(family, transport, addresses, sport, dport, tlvs, ssl_value, crc, payload, cuts):
    if family == "unix":
        path = st.binary(min_size=1, max_size=107).filter(lambda p: b"\x00" not in p)
        source, destination = addresses.draw(path), addresses.draw(path)
    else:
        strategy = ipv4 if family == "inet" else ipv6
        source, destination = (addresses.draw(strategy), sport), (addresses.draw(strategy), dport)
    encoded = [build.tlv(kind, value) for kind, value in tlvs]
    if ssl_value is not None:
        encoded.append(build.ssl_tlv(*ssl_value))
    data = build.v2(source, destination, family, transport, tlvs=encoded, crc=crc)
    kind, header, fed = feed_in_chunks(data + payload, cuts)
    assert kind == "header", header
    assert (header.version, header.command, header.family, header.transport) == (2, "PROXY", family, transport)
    if family == "unix":
        assert header.source == source.decode("utf-8", "backslashreplace")
        assert header.client_address() is None
    else:
        assert header.source == (str(ipaddress.ip_address(source[0])), sport)
        assert header.destination == (str(ipaddress.ip_address(destination[0])), dport)
        assert header.client_address() == header.source
    assert header.tlvs == expected_tlvs(tlvs, ssl_value)
    assert header.length == len(data) and header.rest == (data + payload)[len(data):fed]


mutations = st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate"]),
                               st.integers(min_value=0, max_value=4200), st.integers(min_value=0, max_value=255)),
                     min_size=1, max_size=4)


def mutate(data, steps):
    data = bytearray(data)
    for what, where, byte in steps:
        index = where % (len(data) + 1)
        if what == "flip" and index < len(data):
            data[index] ^= byte or 1
        elif what == "insert":
            data[index:index] = bytes([byte])
        elif what == "delete" and index < len(data):
            del data[index]
        elif what == "truncate":
            del data[index:]
    return bytes(data)


@FUZZ
@given(seed=st.sampled_from(VALID + INVALID), steps=mutations, cuts=cuts, mode=st.sampled_from(["v1", "v2", "any"]))
def test_mutated_corpus_headers_never_raise_anything_else(seed, steps, cuts, mode):
    data = mutate(seed, steps)
    outcome = feed_in_chunks(data, cuts, mode)
    check_invariants(data, outcome)


def test_the_seed_corpus_parses_as_recorded():
    for entry in CORPUS["valid"]:
        data = bytes.fromhex(entry["hex"])
        for cut in (1, 7, 16, len(data) // 2):
            kind, header, _ = feed_in_chunks(data, [cut])
            assert kind == "header", (entry["name"], header)
            assert header.metadata() == entry["metadata"], entry["name"]
            assert header.rest.hex() == entry["rest_hex"], entry["name"]
    for entry in CORPUS["invalid"]:
        kind, reason, _ = feed_in_chunks(bytes.fromhex(entry["hex"]), [])
        assert kind == "error", (entry["name"], reason)
