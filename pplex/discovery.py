"""Workers found by DNS: an upstream entry `{"dns": NAME, "port": P, "refresh": S}`.

Every `refresh` seconds the name is resolved (off the reactor thread: the
system resolver blocks) and the answer becomes one upstream per address, on
the reactor thread:

- a new address is added (`Upstreams.add`): it runs the ready cycle first and
  joins rotation when its ready probe answers;
- an address that vanished is drained (`Upstreams.drain`): no new messages, it
  answers what it was given, then it is removed; never cut;
- a failed lookup or an empty answer keeps the last good set and is logged
  (rate limited): a DNS blip must not empty the pool;
- an upstream of the set removed through the admin API is added again at the
  next lookup while the name still resolves to it (DNS is the source of truth).

This is how a Kubernetes headless Service is used: its name resolves to the
ready pods' IPs (see examples/kubernetes/). `resolve(name, port)` is a seam:
the default asks the system resolver (getaddrinfo: /etc/hosts, then DNS);
tests pass their own.
"""
import concurrent.futures
import logging
import socket
import time

from pplex import limits
from pplex.errors import DuplicateUpstream
from pplex.logs import RateLimited

log = logging.getLogger("pplex.discovery")


def system_resolve(name, port):
    """Every address `name` resolves to (sorted text, IPv4 and IPv6); raises OSError (socket.gaierror)."""
    infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


class DnsPool:
    """The upstreams of one DNS entry. Its methods run on the reactor thread."""

    def __init__(self, discovery, spec):
        self.discovery = discovery
        self.name = spec["dns"]
        self.port = spec["port"]
        self.refresh = spec["refresh"]
        # Each address becomes one worker with these settings (the entry's, minus its name and refresh).
        self.worker_spec = {key: value for key, value in spec.items() if key not in ("dns", "refresh")}
        self.members = {}          # address -> upstream id
        self.lookups = 0
        self.failures = 0
        self.last_error = None
        self.last_good = None      # reactor clock of the last usable answer
        self.in_flight = False
        self.timer = None
        self.closed = False

    def as_dict(self):
        reactor = self.discovery.reactor
        return {"dns": self.name, "port": self.port, "refresh": self.refresh,
                "addresses": sorted(self.members), "lookups": self.lookups, "failures": self.failures,
                "last_error": self.last_error,
                "last_good_seconds": (round(reactor.clock() - self.last_good, 3)
                                      if self.last_good is not None else None)}

    def lookup(self):
        self.timer = None
        if self.closed:
            return
        if self.in_flight:  # the resolver is slower than the refresh: wait for it, do not pile up
            self.discovery.limiter.warning(log, f"slow {self.name}", "DNS lookup of %s still running after "
                                           "%g s", self.name, self.refresh)
            self.timer = self.discovery.reactor.call_later(self.refresh, self.lookup)
            return
        self.in_flight = True
        self.discovery.submit(self)

    def answered(self, addresses, error):
        self.in_flight = False
        if self.closed:
            return
        self.lookups += 1
        self.timer = self.discovery.reactor.call_later(self.refresh, self.lookup)
        if error is None and not addresses:
            error = "the name resolved to no address"
        if error is not None:
            self.failures += 1
            self.last_error = error
            kept = ", ".join(sorted(self.members)) or "none"
            self.discovery.limiter.warning(log, f"lookup {self.name}", "DNS lookup of %s failed: %s; keeping "
                                           "the last good set (%s)", self.name, error, kept)
            return
        self.last_error = None
        self.last_good = self.discovery.reactor.clock()
        if len(addresses) > limits.DNS_MAX_ADDRESSES:
            self.discovery.limiter.warning(log, f"many {self.name}", "%s resolved to %d addresses; using the "
                                           "first %d", self.name, len(addresses), limits.DNS_MAX_ADDRESSES)
            addresses = addresses[:limits.DNS_MAX_ADDRESSES]
        self.apply(set(addresses))

    def apply(self, addresses):
        upstreams = self.discovery.upstreams
        # Forget members removed behind our back (admin API, drained): they may be added again.
        for address, upstream_id in list(self.members.items()):
            upstream = upstreams.get(upstream_id)
            if upstream is None or upstream.state == "draining":
                del self.members[address]
        for address in sorted(addresses - self.members.keys()):
            try:
                upstream = upstreams.add({**self.worker_spec, "host": address})
            except DuplicateUpstream as error:  # listed by hand too, or still draining: next lookup
                self.discovery.limiter.warning(log, f"dup {address}", "DNS %s: not adding %s: %s",
                                               self.name, address, error)
                continue
            self.members[address] = upstream.id
            log.info("DNS %s: new address %s, upstream %s added", self.name, address, upstream.id)
        for address in sorted(self.members.keys() - addresses):
            upstream_id = self.members.pop(address)
            log.info("DNS %s: address %s is gone, draining upstream %s", self.name, address, upstream_id)
            upstreams.drain(upstream_id)

    def close(self):
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class Discovery:
    """Every DNS upstream entry of one proxy, and the threads that resolve them."""

    def __init__(self, reactor, upstreams, resolve=system_resolve, threads=2):
        self.reactor = reactor
        self.upstreams = upstreams
        self.resolve = resolve
        self.pools = []
        self.limiter = RateLimited()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pplex-dns")

    def __iter__(self):
        return iter(self.pools)

    def __len__(self):
        return len(self.pools)

    def add(self, spec):
        """Start resolving one `{"dns", "port", "refresh", ...}` entry now; returns its DnsPool."""
        pool = DnsPool(self, spec)
        self.pools.append(pool)
        log.info("DNS %s: resolving every %g s for workers on port %d", pool.name, pool.refresh, pool.port)
        pool.lookup()
        return pool

    def submit(self, pool):
        try:
            self._executor.submit(self._resolve, pool)
        except RuntimeError:  # shut down
            pool.in_flight = False

    def _resolve(self, pool):
        started = time.monotonic()
        try:
            addresses, error = list(self.resolve(pool.name, pool.port)), None
        except Exception as error_:  # socket.gaierror, a test resolver's error: all mean "no answer"
            addresses, error = [], f"{error_.__class__.__name__}: {error_}"
        took = time.monotonic() - started
        if took > 1.0:
            log.info("DNS lookup of %s took %.1f s", pool.name, took)
        self.reactor.call_soon_threadsafe(pool.answered, addresses, error)

    def close(self):
        for pool in self.pools:
            pool.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
