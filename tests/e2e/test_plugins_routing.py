"""route_sticky, route_prefix, least_pending and hash end to end, with workers that sign their replies."""
import threading

from tests.helpers import RecordingWorker, free_port, wait_for


class TaggedWorker(RecordingWorker):
    """Replies `name:payload`, so a client sees which worker answered."""

    def on_message(self, stream, client_uuid, payload):
        with self.lock:
            self.received.append((client_uuid, payload))
        stream.reply(client_uuid, self.name.encode() + b":" + payload)


class StuckWorker(TaggedWorker):
    """Answers nothing until `release()` (its messages stay in flight), then answers as TaggedWorker."""

    def __init__(self, name):
        super().__init__(name)
        self.held = []
        self.stream = None

    def on_message(self, stream, client_uuid, payload):
        with self.lock:
            if self.held is not None:
                self.received.append((client_uuid, payload))
                self.held.append(client_uuid)
                self.stream = stream
                return
        super().on_message(stream, client_uuid, payload)

    def release(self):
        with self.lock:
            held, self.held = self.held, None
        for client_uuid in held:
            self.stream.reply(client_uuid, self.name.encode() + b":released")


def start_tagged(start_worker, count):
    return [start_worker(TaggedWorker(f"w{i}")) for i in range(count)]


def upstream_args(*workers):
    return [a for w in workers for a in ("--upstream", f"127.0.0.1:{w.port}")]


def ask(client, text):
    """Send one line; return the name of the worker that answered it."""
    client.send(text.encode() + b"\n")
    name, _, echoed = client.recv_line().partition(b":")
    assert echoed == text.encode()
    return name.decode()


def upstream_id_of(pplex, worker):
    return next(u["id"] for u in pplex.upstreams() if u["port"] == worker.port)


def test_sticky_client_stays_on_one_worker_and_moves_when_it_is_removed(start_pplex, start_worker):
    workers = start_tagged(start_worker, 3)
    pplex = start_pplex("--plugins", "framing_line,route_sticky", *upstream_args(*workers))
    pplex.wait_ready_upstreams(3)
    clients = [pplex.client() for _ in range(6)]
    homes = []
    for index, client in enumerate(clients):
        names = {ask(client, f"c{index} m{seq}") for seq in range(10)}
        assert len(names) == 1, names  # every message of a client on one worker
        homes.append(names.pop())
    assert len(set(homes)) > 1  # first picks still spread (round-robin), stickiness comes after
    mover = clients[0]
    home = next(w for w in workers if w.name == homes[0])
    status, _ = pplex.admin("DELETE", f"/upstreams/{upstream_id_of(pplex, home)}")
    assert status == 200
    new_names = {ask(mover, f"moved m{seq}") for seq in range(10)}
    assert len(new_names) == 1 and homes[0] not in new_names  # moved once, then sticks again
    assert pplex.admin("GET", "/connections")[1]["count"] == 6  # nobody was disconnected
    for index, client in enumerate(clients[1:], start=1):  # the others stay where they were
        if homes[index] != homes[0]:
            assert ask(client, "again") == homes[index]


def test_prefix_routes_two_pools_longest_prefix_first(start_pplex, start_worker):
    workers = start_tagged(start_worker, 5)
    routes = {
        "chat:": [f"127.0.0.1:{workers[0].port}", f"127.0.0.1:{workers[1].port}"],
        "game:": [f"127.0.0.1:{workers[2].port}", f"127.0.0.1:{workers[3].port}"],
        "game:boss:": [f"127.0.0.1:{workers[3].port}"],
    }
    config = {"plugins": {"framing_line": {}, "route_prefix": {"routes": routes}}}
    pplex = start_pplex(*upstream_args(*workers), config=config)
    pplex.wait_ready_upstreams(5)
    client = pplex.client()
    # One kind at a time: the round-robin balancer's turn is shared by every message.
    seen = {kind: {ask(client, f"{kind}{seq}") for seq in range(10)}
            for kind in ("chat:", "game:", "game:boss:", "other")}
    assert seen["chat:"] == {"w0", "w1"}  # the pool, both of it (round-robin), nothing else
    assert seen["game:"] == {"w2", "w3"}
    assert seen["game:boss:"] == {"w3"}
    assert seen["other"] == {"w0", "w1", "w2", "w3", "w4"}  # default "any"


def test_prefix_pool_without_a_ready_worker_holds_its_messages(start_pplex, start_worker):
    other = start_worker(TaggedWorker("other"))
    vip_port = free_port()
    config = {"plugins": {"framing_line": {}, "route_prefix": {
        "routes": {"vip:": [f"127.0.0.1:{vip_port}"]}, "default": "any"}}}
    pplex = start_pplex(*upstream_args(other), config=config)
    pplex.wait_ready_upstreams(1)
    client = pplex.client()
    client.send(b"vip:first\n")
    assert ask(pplex.client(), "plain") == "other"  # other traffic flows meanwhile
    vip = start_worker(TaggedWorker("vip"), port=vip_port)
    status, _ = pplex.admin("POST", "/upstreams", {"host": "127.0.0.1", "port": vip_port})
    assert status == 201
    assert client.recv_line() == b"vip:vip:first"  # waited for its pool, not sent to "other"
    assert other.count() == 1 and vip.count() == 1


def test_least_pending_avoids_a_worker_with_messages_in_flight(start_pplex, start_worker):
    stuck = start_worker(StuckWorker("stuck"))
    fast = start_worker(TaggedWorker("fast"))
    pplex = start_pplex("--plugins", "framing_line,least_pending", *upstream_args(stuck, fast))
    pplex.wait_ready_upstreams(2)
    waiting = []
    for index in range(20):  # one at a time, each from a new client
        client = pplex.client()
        client.send(b"m%d\n" % index)
        wait_for(lambda: stuck.count() + fast.count() == index + 1, message=f"message {index} at a worker")
        if stuck.count() and stuck.received[-1][1] == b"m%d" % index:
            waiting.append(client)  # went to the stuck worker: no answer yet
        else:
            assert client.recv_line() == b"fast:m%d" % index  # answered: fast has none in flight again
    # Round-robin would give the stuck worker half; least_pending gives it one (the first tie), then
    # it has 1 in flight against 0, every time.
    assert stuck.count() == 1 and fast.count() == 19
    stuck.release()
    assert waiting[0].recv_line() == b"stuck:released"
    # Nothing in flight anywhere now: ties go round-robin, so both workers answer again.
    client = pplex.client()
    assert {ask(client, f"n{seq}") for seq in range(6)} == {"stuck", "fast"}


def test_hash_keeps_each_client_on_its_worker(start_pplex, start_worker):
    workers = start_tagged(start_worker, 3)
    pplex = start_pplex("--plugins", "framing_line,hash", *upstream_args(*workers))
    pplex.wait_ready_upstreams(3)
    clients = [pplex.client() for _ in range(12)]
    errors = []
    homes = [None] * len(clients)

    def talk(index):
        try:
            names = {ask(clients[index], f"c{index} m{seq}") for seq in range(10)}
            assert len(names) == 1, names
            homes[index] = names.pop()
        except Exception as error:  # reported below
            errors.append((index, error))

    threads = [threading.Thread(target=talk, args=(i,)) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    # 12 clients over 3 workers: the hash spreads them (all on one worker: odds about 1 in 60,000).
    assert len(set(homes)) > 1
    # The worker's record agrees: each client UUID reached exactly one worker.
    owners = {}
    for worker in workers:
        for client_uuid, _ in worker.received:
            owners.setdefault(client_uuid, set()).add(worker.name)
    assert len(owners) == 12 and all(len(names) == 1 for names in owners.values())
