"""The Redis implementation of `pplex.broker.BrokerClient`, on redis-py's asyncio client (pub/sub).

Redis pub/sub is fire-and-forget like NATS core: a message reaches the
subscribers connected at that moment, nothing is kept. Two connections: one
subscribed (it can do nothing else), one that publishes, a batch at a time in
one pipeline (one round trip). redis-py's own retries are off (`retries=0`):
pplex's broker thread runs the reconnect cycle. Redis sends a node its own
publishes; `pplex.cluster` drops frames whose origin is itself.
"""
import asyncio

import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

from pplex import limits
from pplex.broker import BrokerClient

# The publishing connection pings this often; no answer within the connect timeout is a lost broker.
PING_INTERVAL_SECONDS = 5.0


class RedisClient(BrokerClient):
    # Redis takes up to 512 MiB per message; a worker message is at most 64 MiB.
    max_payload = 64 * 1024 * 1024

    def __init__(self, url):
        self.url = url
        self.redis = None
        self.pubsub = None
        self._tasks = []
        self._lost = None

    async def connect(self, subjects, deliver):
        loop = asyncio.get_running_loop()
        self._lost = loop.create_future()
        self.redis = redis.asyncio.Redis.from_url(
            self.url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=limits.BROKER_CONNECT_TIMEOUT_SECONDS,
            socket_keepalive=True)
        await self.redis.ping()
        self.pubsub = self.redis.pubsub()
        await self.pubsub.subscribe(*subjects)
        waiting = {s.encode() for s in subjects}
        deadline = loop.time() + limits.BROKER_CONNECT_TIMEOUT_SECONDS
        while waiting:  # the server confirms each subscription before it is in force
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError("Redis did not confirm the subscriptions")
            message = await self.pubsub.get_message(timeout=left)
            if message is not None and message["type"] == "subscribe":
                waiting.discard(message["channel"])
        self._tasks = [asyncio.ensure_future(self._read(deliver)), asyncio.ensure_future(self._ping())]

    def _set_lost(self, detail):
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(detail)

    async def _read(self, deliver):
        try:
            async for message in self.pubsub.listen():
                if message["type"] == "message":
                    deliver(message["data"])
            self._set_lost("the subscription ended")
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self._set_lost(f"{error.__class__.__name__}: {error}")

    async def _ping(self):
        try:
            while True:
                await asyncio.sleep(PING_INTERVAL_SECONDS)
                await asyncio.wait_for(self.redis.ping(), limits.BROKER_CONNECT_TIMEOUT_SECONDS)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self._set_lost(f"no answer to PING: {error.__class__.__name__}: {error}")

    async def publish(self, items):
        pipe = self.redis.pipeline(transaction=False)
        for subject, frame, _count in items:
            pipe.publish(subject, frame)
        await pipe.execute()

    async def lost(self):
        return await self._lost

    async def close(self):
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        for closing in (self.pubsub, self.redis):
            if closing is None:
                continue
            try:
                await closing.aclose()
            except Exception:  # the connection may already be broken; it is gone either way
                pass
        self.pubsub = self.redis = None
