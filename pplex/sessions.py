"""Sessions: the names and bookkeeping of the contract's session extension, with no I/O.

What the proxy core uses to send lifecycle events and apply group actions
(README, "Sessions"):

- the DISCONNECTED reasons are `pplex.reasons` (one list for logs, stats and
  workers);
- `connected_metadata(...)`: the CONNECTED metadata map (all values strings).
- `Groups`: which clients are in which group, both ways, with the limits a
  worker cannot exceed (names per client, name length, groups in all); an
  action beyond them is refused with a one-line reason, never raised.

Members are opaque hashable objects (the proxy's connections); nothing here
knows sockets or streams.
"""
import itertools

from pplex import limits

LIFECYCLE = "lifecycle"        # the ReadyResult.features word
NODE_HEADER = "pplex-node"     # request metadata of every data stream: this instance's id


def _text(value):
    """A metadata value as a string protobuf accepts (valid UTF-8: a lone surrogate becomes "?")."""
    return str(value).encode("utf-8", "replace").decode("utf-8")


def connected_metadata(remote, local, node, proxy=None, tls=None):
    """CONNECTED metadata: `remote` / `local` are (address, port) pairs, `node` this instance's id;
    `proxy` a dict of proxy_* facts (`proxyproto.Header.metadata()`), `tls` a dict of tls_* facts.
    Facts from outside (PROXY TLVs, certificate subjects) are made valid UTF-8 strings."""
    meta = {"remote_addr": str(remote[0]), "remote_port": str(remote[1]),
            "local_addr": str(local[0]), "local_port": str(local[1]), "node": node}
    for facts in (proxy, tls):
        if facts:
            for key, value in facts.items():
                meta[_text(key)] = _text(value)
    return meta


class Groups:
    """Group membership: name -> members and member -> names, kept in step.

    `join` / `leave` return None when applied, or a one-line reason when
    refused (the caller counts and logs it). A member leaves every group with
    `drop` when it goes. Empty groups are forgotten.
    """

    def __init__(self, max_per_client=limits.MAX_GROUPS_PER_CLIENT.default,
                 max_name_bytes=limits.MAX_GROUP_NAME_BYTES.default, max_groups=limits.MAX_GROUPS.default):
        self.max_per_client = max_per_client
        self.max_name_bytes = max_name_bytes
        self.max_groups = max_groups
        self._members = {}   # name -> set of members
        self._of = {}        # member -> set of names

    def _check_name(self, name):
        if not isinstance(name, str) or not name:
            return "a group name must be a non-empty string"
        if len(name.encode("utf-8", "surrogatepass")) > self.max_name_bytes:
            return f"group name over {self.max_name_bytes} bytes"
        return None

    def join(self, member, names):
        """Add `member` to each of `names` (all or none)."""
        for name in names:
            refused = self._check_name(name)
            if refused:
                return refused
        mine = self._of.get(member, ())
        new = {name for name in names if name not in mine}
        if len(mine) + len(new) > self.max_per_client:
            return f"a client may be in at most {self.max_per_client} groups"
        created = sum(1 for name in new if name not in self._members)
        if len(self._members) + created > self.max_groups:
            return f"at most {self.max_groups} groups in all"
        if new:
            self._of.setdefault(member, set()).update(new)
            for name in new:
                self._members.setdefault(name, set()).add(member)
        return None

    def leave(self, member, names):
        """Remove `member` from each of `names` it is in; names it is not in are no error."""
        for name in names:
            refused = self._check_name(name)
            if refused:
                return refused
        mine = self._of.get(member)
        if not mine:
            return None
        for name in names:
            if name in mine:
                mine.discard(name)
                self._forget(name, member)
        if not mine:
            del self._of[member]
        return None

    def drop(self, member):
        """`member` is gone: out of every group."""
        for name in self._of.pop(member, ()):
            self._forget(name, member)

    def _forget(self, name, member):
        members = self._members.get(name)
        if members is not None:
            members.discard(member)
            if not members:
                del self._members[name]

    def members(self, name):
        """The members of `name`, as a tuple (safe to iterate while members go)."""
        return tuple(self._members.get(name, ()))

    def groups_of(self, member):
        return sorted(self._of.get(member, ()))

    def listing(self):
        """[(name, members count)], sorted by name."""
        return sorted((name, len(members)) for name, members in self._members.items())

    def page(self, offset=0, limit=100, query=""):
        """(groups matched, [(name, members count)]) for GET /groups: at most `limit` from `offset`, in the
        order groups were made (no sort: a page costs its size, not the number of groups); `query`: only
        names containing it (then every name is looked at)."""
        if query:
            names = [name for name in self._members if query in name]
            matched, shown = len(names), names[offset:offset + limit]
        else:
            matched, shown = len(self._members), itertools.islice(self._members, offset, offset + limit)
        return matched, [(name, len(self._members[name])) for name in shown]

    def __contains__(self, member):
        return member in self._of

    def __len__(self):
        return len(self._members)
