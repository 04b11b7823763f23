"""This process's node identity: its id, its UUID tag, the client UUIDs it makes, its log field.

Every pplex process is one node of a cluster (alone, without a broker). Its id
is `cluster.node` from the config or, when unset, made at start from the host
name and random hex (`edge-7-3fa9c2`); a child of `--processes N` gets the
parent's id with `-<index>` appended. The id is shown in logs (`%(node)s`), in
`/stats`, in `/metrics` labels and in the `pplex-node` request header of every
call pplex makes to a worker.

**Client UUIDs name their node.** A client UUID is still a UUIDv4 on the wire
(version nibble 4, variant bits 10, RFC 9562 section 5.4), but its first 32 bits,
the first 8 hex digits of its text form, are the node's *tag*: the first 4 bytes
of BLAKE2b(node id). The other 90 bits are random (os.urandom), plenty to keep
UUIDs unique within a node. So any node can tell from a UUID which node owns the
client, and a reply for it goes straight there (`pplex.cluster`). Two ids with
the same tag (one chance in 2**32 per pair) are detected through heartbeats and
logged.
"""
import hashlib
import logging
import os
import re
import socket

ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TAG_HEX_DIGITS = 8
_HEX = frozenset("0123456789abcdef")


def tag_of(node_id):
    """The 8 lowercase hex digits that start every client UUID of node `node_id`."""
    return hashlib.blake2b(node_id.encode(), digest_size=4).hexdigest()


def random_id():
    """`<short host name>-<6 random hex digits>`, restricted to the id alphabet."""
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname().split(".")[0])[:40] or "pplex"
    return f"{host}-{os.urandom(3).hex()}"


def uuid_tag(text):
    """The node tag of a client UUID in text form, or None when it is not one pplex could have made."""
    if len(text) != 36 or text[8] != "-":
        return None
    tag = text[:8].lower()
    return tag if _HEX.issuperset(tag) else None


class Node:
    """One node's identity: `id` (str), `tag` (8 hex digits), `instance` (4 random bytes per start).

    `metadata` is what every call to a worker carries: `pplex-node: <id>`, and
    `pplex-cluster: <name>` when the node is part of a cluster (a worker that
    broadcasts on one stream per cluster reaches every client once).
    """

    __slots__ = ("id", "tag", "instance", "cluster", "metadata", "headers")

    def __init__(self, node_id, cluster=None):
        if not ID_PATTERN.match(node_id):
            raise ValueError(f"node id must be 1 to 64 of A-Z a-z 0-9 _ - (got {node_id!r})")
        self.id = node_id
        self.tag = tag_of(node_id)
        # A restarted node keeps its id and tag; the instance tells its frames from the old one's.
        self.instance = os.urandom(4)
        self.cluster = cluster
        self.metadata = (("pplex-node", node_id),) + ((("pplex-cluster", cluster),) if cluster else ())
        self.headers = tuple((name.encode("ascii"), value.encode("ascii")) for name, value in self.metadata)

    def __repr__(self):
        return f"<Node {self.id} tag {self.tag}>"

    def owns(self, client_uuid):
        return uuid_tag(client_uuid) == self.tag

    def uuid_maker(self):
        """A function returning a fresh client UUID (text) of this node: UUIDv4 with the tag up front.

        Built from one urandom call and string slices: about as cheap as `str(uuid.uuid4())`.
        """
        prefix = self.tag + "-"
        urandom = os.urandom
        variant = "89ab"

        def new_uuid():
            h = urandom(12).hex()  # 24 random hex digits
            return (f"{prefix}{h[0:4]}-4{h[5:8]}-{variant[int(h[8], 16) & 3]}{h[9:12]}-{h[12:24]}")
        return new_uuid


# The process's node. Set once at startup (`configure`), before any link, log line
# or client; read by the transports (the pplex-node header) and the log field.
current = Node(random_id())


def configure(node_id=None, index=None, cluster=None):
    """Set this process's node: `node_id` (or a random one), `-<index>` appended for a child;
    `cluster`: the cluster's name when a broker is configured."""
    global current
    base = node_id or random_id()
    current = Node(base if index is None else f"{base}-{index}", cluster)
    return current


class LogField(logging.Filter):
    """Adds `record.node` (this process's node id) so a log format can show `%(node)s`."""

    def filter(self, record):
        record.node = current.id
        return True


def install_log_field():
    """Give every handler of the root logger the `node` field (call after logging.basicConfig)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, LogField) for f in handler.filters):
            handler.addFilter(LogField())
