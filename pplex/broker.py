"""The broker connection: one client (NATS or Redis) run off the reactor thread.

`Broker` owns a thread with its own asyncio loop, on which a `BrokerClient`
(`pplex.broker_nats`, `pplex.broker_redis`) connects, subscribes, publishes
and reads. The reactor thread and the broker thread meet in two places only:

- **out**: `Broker.publish(subject, frame, count)` appends to a bounded
  queue under a lock and wakes the broker loop (once per burst); the loop
  publishes everything queued in one go. It never blocks: past
  `RELAY_OUTGOING_BYTES`, above the server's largest message, or while the
  broker is down, it refuses, and the caller counts the relays as unrelayed.
- **in**: frames read from the broker gather in a bounded inbox and reach the
  reactor in batches, one `Reactor.call_soon_threadsafe` per batch (the way
  the grpcio bridge hands its events over), as `on_frames(list of bytes)`.
  Past `RELAY_INBOUND_BYTES` frames are dropped and counted: a reactor that
  falls behind must not grow memory without bound.

The connection's health reaches the reactor as `on_state(up, detail)`. A lost
or refused connection is retried with capped, jittered exponential backoff
(`BROKER_RETRY_FIRST_SECONDS` doubling to `BROKER_RETRY_MAX_SECONDS`); the
first failure of an episode is logged once at warning level, repeats through
`RateLimited`, and the recovery once with the episode's length. Relays queued
when the connection is lost are counted as unrelayed (at most once).
"""
import asyncio
import collections
import logging
import random
import threading
import time
from urllib.parse import urlsplit, urlunsplit

from pplex import limits
from pplex.logs import RateLimited

log = logging.getLogger("pplex.broker")


def redact(url):
    """The URL with any password replaced by `***`, for logs and the admin API."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[-1]}"))


class BrokerClient:
    """One connection to a broker, used only on the broker thread's asyncio loop."""

    #: Largest frame the broker takes in one publish (bytes); set by connect() when the server says.
    max_payload = 1024 * 1024

    async def connect(self, subjects, deliver):
        """Connect and subscribe to `subjects`; `deliver(frame)` is called on the loop for each message.

        Returns once the subscriptions are in force (a frame published by
        another node after this returns reaches us). Raises on failure.
        """
        raise NotImplementedError

    async def publish(self, items):
        """Publish `(subject, frame, count)` items in order; raises when the connection failed."""
        raise NotImplementedError

    async def lost(self):
        """Return (a detail string) when the connection is lost."""
        raise NotImplementedError

    async def close(self):
        """Close the connection; must not raise."""
        raise NotImplementedError


def client_for(url):
    """A BrokerClient for `nats://`, `tls://`, `redis://` or `rediss://` URLs."""
    scheme = urlsplit(url).scheme
    if scheme in ("nats", "tls"):
        from pplex.broker_nats import NatsClient
        return NatsClient(url)
    if scheme in ("redis", "rediss"):
        from pplex.broker_redis import RedisClient
        return RedisClient(url)
    raise ValueError(f"unknown broker scheme {scheme!r}")


class Broker:
    """A broker connection on its own thread; `publish` and the callbacks are for the reactor thread.

    `on_frames(frames)` and `on_state(up, detail)` are called on the reactor
    thread. `make_client()` returns a fresh BrokerClient per connection attempt.
    """

    def __init__(self, url, reactor, subjects, on_frames, on_state, make_client=None):
        self.url = url
        self.shown_url = redact(url)
        self.reactor = reactor
        self.subjects = tuple(subjects)
        self._on_frames = on_frames
        self._on_state = on_state
        self._make_client = make_client or (lambda: client_for(url))
        self._lock = threading.Lock()
        self._out = collections.deque()   # (subject, frame, count)
        self._out_bytes = 0
        self._out_woken = False
        self._inbox = []
        self._inbox_bytes = 0
        self._inbox_posted = False
        self._up = False                  # written by the broker thread, read by any
        self._stopping = False
        self._loop = None
        self._wake = None                 # asyncio.Event of the writer, made on the loop
        self._thread = threading.Thread(target=self._run_thread, name="pplex-broker", daemon=True)
        self._limiter = RateLimited()
        # Counters written on the broker thread (plain ints, read from the reactor).
        self.published_frames = 0
        self.lost_relays = 0         # relays queued or in flight when the connection failed
        self.inbound_dropped = 0     # frames dropped because the reactor had too many waiting
        self.connects = 0
        self.detail = "connecting"
        self.max_payload = BrokerClient.max_payload  # the connected server's, once known
        self.client = None  # the latest connection (its own counters, e.g. NATS slow-consumer errors)

    @property
    def up(self):
        return self._up

    # -- reactor side --------------------------------------------------------
    def start(self):
        self._thread.start()

    def publish(self, subject, frame, count=1):
        """Queue a frame of `count` relays: None, or why it was refused (nothing queued then).

        Reasons: `broker_down`, `backlog` (the queue is full), `too_large`
        (above the broker's largest message).
        """
        if not self._up:
            return "broker_down"
        if len(frame) > self.max_payload:
            return "too_large"
        with self._lock:
            if self._out_bytes + len(frame) > limits.RELAY_OUTGOING_BYTES:
                return "backlog"
            self._out.append((subject, frame, count))
            self._out_bytes += len(frame)
            if self._out_woken:
                return None
            self._out_woken = True
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._wake_writer)
            except RuntimeError:  # the loop closed during shutdown
                pass
        return None

    def _deliver(self):
        with self._lock:
            frames, self._inbox = self._inbox, []
            self._inbox_bytes = 0
            self._inbox_posted = False
        self._on_frames(frames)

    def close(self, timeout=2.0):
        """Stop the thread: publish what is queued if connected (within `timeout`), then disconnect.
        Safe before `start` (`pplex check` builds and closes an App that never starts)."""
        self._stopping = True
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._wake_writer)
            except RuntimeError:
                pass
        if self._thread.ident is not None:  # joining a thread never started raises
            self._thread.join(timeout)

    # -- broker thread ---------------------------------------------------------
    def _run_thread(self):
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._run())
        except Exception:  # a bug here must not take pplex down: local traffic goes on
            log.exception("the broker thread stopped; relaying is off until pplex restarts")
            self._set_state(False, "broker thread failed")
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    def _wake_writer(self):
        if self._wake is not None:
            self._wake.set()

    def _received(self, frame):
        """On the broker loop, for each frame read: into the inbox; one reactor hand-off per batch."""
        with self._lock:
            if self._inbox_bytes + len(frame) > limits.RELAY_INBOUND_BYTES:
                self.inbound_dropped += 1
                return
            self._inbox.append(frame)
            self._inbox_bytes += len(frame)
            if self._inbox_posted:
                return
            self._inbox_posted = True
        self.reactor.call_soon_threadsafe(self._deliver)

    def _set_state(self, up, detail):
        self._up = up
        self.detail = detail
        self.reactor.call_soon_threadsafe(self._on_state, up, detail)

    async def _run(self):
        self._wake = asyncio.Event()
        failures = 0
        down_since = None
        while not self._stopping:
            client = self._make_client()
            try:
                await asyncio.wait_for(client.connect(self.subjects, self._received),
                                       limits.BROKER_CONNECT_TIMEOUT_SECONDS)
            except Exception as error:
                await _quietly(client.close())
                detail = _describe(error)
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning("broker %s unreachable: %s; local traffic goes on, relays are counted "
                                "as unrelayed; retrying with backoff", self.shown_url, detail)
                else:
                    self._limiter.warning(log, "retry", "broker %s still unreachable: %s", self.shown_url, detail)
                if self._up or self.detail != detail:
                    self._set_state(False, detail)
                await self._backoff(failures)
                failures = min(failures + 1, 16)
                continue
            failures = 0
            self.connects += 1
            self.max_payload = client.max_payload
            self.client = client
            if down_since is not None:
                log.warning("broker %s reachable again after %.1f s; relaying resumes",
                            self.shown_url, time.monotonic() - down_since)
                down_since = None
            else:
                log.info("connected to broker %s (subjects %s)", self.shown_url, ", ".join(self.subjects))
            self._set_state(True, "connected")
            detail = await self._serve(client)
            await _quietly(client.close())
            if self._stopping:
                break
            down_since = time.monotonic()
            log.warning("lost the broker %s: %s; local traffic goes on, relays are counted as "
                        "unrelayed; reconnecting with backoff", self.shown_url, detail)
            self._set_state(False, detail)
            await self._backoff(0)
        self._set_state(False, "stopped")

    async def _serve(self, client):
        """Publish until the connection is lost or pplex stops; returns why it ended."""
        lost = asyncio.ensure_future(client.lost())
        try:
            while True:
                self._wake.clear()
                items = self._take_out()
                if items:
                    try:
                        await client.publish(items)
                        self.published_frames += len(items)
                    except Exception as error:
                        self.lost_relays += sum(item[2] for item in items)
                        return f"publish failed: {_describe(error)}"
                    continue
                if self._stopping:
                    return "stopping"
                waiter = asyncio.ensure_future(self._wake.wait())
                await asyncio.wait({waiter, lost}, return_when=asyncio.FIRST_COMPLETED)
                if lost.done():
                    waiter.cancel()
                    return lost.result() if not lost.cancelled() else "lost"
        finally:
            self._up = False
            # Whatever is still queued will not go out on this connection: count it.
            self.lost_relays += sum(item[2] for item in self._take_out())
            if not lost.done():
                lost.cancel()

    def _take_out(self):
        with self._lock:
            items = list(self._out)
            self._out.clear()
            self._out_bytes = 0
            self._out_woken = False
        return items

    async def _backoff(self, failures):
        delay = min(limits.BROKER_RETRY_MAX_SECONDS, limits.BROKER_RETRY_FIRST_SECONDS * 2 ** failures)
        delay *= random.uniform(0.5, 1.0)  # nodes that lost the broker together do not retry together
        self._wake.clear()
        if self._stopping:
            return
        try:
            await asyncio.wait_for(self._wake.wait(), delay)  # close() cuts the wait short
        except asyncio.TimeoutError:
            pass


async def _quietly(coroutine):
    try:
        await asyncio.wait_for(coroutine, 1.0)
    except Exception:  # closing a broken connection may fail in many ways; it is gone either way
        pass


def _describe(error):
    text = str(error) or error.__class__.__name__
    return text if len(text) < 300 else text[:300] + "..."
