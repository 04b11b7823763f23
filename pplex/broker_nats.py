"""The NATS implementation of `pplex.broker.BrokerClient`, on nats-py (NATS core pub/sub).

NATS core is fire-and-forget: no persistence, no acknowledgement; exactly the
at-most-once relay pplex documents (JetStream is not used). The connection is
made with nats-py's own reconnection off (`allow_reconnect=False`): pplex's
broker thread runs one reconnect cycle for every broker kind, so a lost
connection is seen, counted and reported the same way for NATS and Redis.
`no_echo` keeps the server from sending a node its own publishes.
"""
import asyncio

import nats
from nats.errors import Error as NatsError, SlowConsumerError

from pplex import limits, node
from pplex.broker import BrokerClient

# How often the client pings the server, and how many pings may go unanswered, so a
# silent half-open connection (a frozen server, a dropped network path) is noticed.
PING_INTERVAL_SECONDS = 5
MAX_OUTSTANDING_PINGS = 2


class NatsClient(BrokerClient):
    def __init__(self, url):
        self.url = url
        self.nc = None
        self._lost = None
        self.slow_consumer_drops = 0

    async def connect(self, subjects, deliver):
        loop = asyncio.get_running_loop()
        self._lost = loop.create_future()

        last_error = ["disconnected from the server"]

        def lost(detail):
            if not self._lost.done():
                self._lost.set_result(detail)

        async def on_error(error):
            # Errors come before a disconnect (which ends the connection) or alone (a slow
            # consumer: messages the server dropped for us; at most once, the connection goes on).
            if isinstance(error, SlowConsumerError):
                self.slow_consumer_drops += 1
                return
            last_error[0] = f"{error.__class__.__name__}: {error}" if str(error) else error.__class__.__name__

        async def on_disconnected():
            lost(last_error[0])

        async def on_closed():
            lost(last_error[0])

        self.nc = await nats.connect(
            servers=[self.url], name=f"pplex {node.current.id}", allow_reconnect=False,
            max_reconnect_attempts=0, connect_timeout=limits.BROKER_CONNECT_TIMEOUT_SECONDS,
            ping_interval=PING_INTERVAL_SECONDS, max_outstanding_pings=MAX_OUTSTANDING_PINGS,
            no_echo=True, error_cb=on_error, disconnected_cb=on_disconnected, closed_cb=on_closed)
        self.max_payload = self.nc.max_payload

        async def handler(msg):
            deliver(msg.data)

        for subject in subjects:
            await self.nc.subscribe(subject, cb=handler, pending_bytes_limit=limits.RELAY_INBOUND_BYTES)
        # A round trip: once the server answers, it has every subscription.
        await self.nc.flush(timeout=limits.BROKER_CONNECT_TIMEOUT_SECONDS)

    async def publish(self, items):
        publish = self.nc.publish
        for subject, frame, _count in items:
            await publish(subject, frame)

    async def lost(self):
        return await self._lost

    async def close(self):
        nc, self.nc = self.nc, None
        if nc is None or nc.is_closed:
            return
        try:
            await nc.flush(timeout=0.5)
        except (NatsError, asyncio.TimeoutError, OSError):
            pass
        await nc.close()
