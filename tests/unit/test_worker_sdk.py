"""The worker SDK's broadcast: once per pplex cluster, once per pplex that is in none."""
from pplex.worker import Stream, Worker


def test_broadcast_goes_once_per_cluster_and_to_every_lone_pplex():
    worker = Worker()
    streams = [Stream("a", "game"), Stream("b", "game"), Stream("x", "other"), Stream("solo"), Stream(None)]
    for stream in streams:
        worker._streams[stream] = None
    worker.broadcast(b"hi")
    sent = [stream._out.qsize() for stream in streams]
    # a and b relay to each other: only the first stream of "game" gets it.
    assert sent == [1, 0, 1, 1, 1]
    assert worker.streams() == streams
