"""The reactor: timers, cancellation, queued calls, wake-ups, end-of-pass callbacks."""
import socket
import threading

from pplex.reactor import READ, Reactor


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def run_one_pass(reactor):
    """Run the loop until the end of its first pass."""
    reactor.add_pass_end(reactor.stop)
    reactor.run()
    reactor._pass_end.remove(reactor.stop)


def test_timers_fire_in_deadline_order_and_cancelled_ones_never():
    clock = FakeClock()
    reactor = Reactor(clock=clock)
    fired = []
    reactor.call_later(3, fired.append, "c")
    reactor.call_later(1, fired.append, "a")
    cancelled = reactor.call_later(2, fired.append, "never")
    reactor.call_later(2, fired.append, "b")
    cancelled.cancel()
    clock.now += 5
    run_one_pass(reactor)
    assert fired == ["a", "b", "c"]


def test_timer_not_yet_due_does_not_fire():
    clock = FakeClock()
    reactor = Reactor(clock=clock)
    fired = []
    reactor.call_later(10, fired.append, "late")
    reactor.call_soon(lambda: None)  # keeps select() from sleeping
    run_one_pass(reactor)
    assert fired == []


def test_heap_is_rebuilt_when_most_timers_are_cancelled():
    reactor = Reactor(clock=FakeClock())
    timers = [reactor.call_later(100 + i, lambda: None) for i in range(1000)]
    for timer in timers[:900]:
        timer.cancel()
    assert len(reactor._timers) < 600


def test_calls_queued_by_a_call_wait_for_the_next_pass():
    reactor = Reactor(clock=FakeClock())
    order = []
    reactor.call_soon(lambda: (order.append(1), reactor.call_soon(order.append, 2)))
    run_one_pass(reactor)
    assert order == [1]
    run_one_pass(reactor)
    assert order == [1, 2]


def test_a_burst_of_threadsafe_calls_costs_one_wake_byte():
    reactor = Reactor()
    got = []

    def burst():
        for i in range(1000):
            reactor.call_soon_threadsafe(got.append, i)
    thread = threading.Thread(target=burst)
    thread.start()
    thread.join()
    assert reactor._wake_r.recv(4096) == b"\0"  # one byte for the whole burst
    reactor._drain_threadsafe()
    assert got == list(range(1000))
    reactor.call_soon_threadsafe(got.append, "next burst")
    assert reactor._wake_r.recv(4096) == b"\0"  # draining re-armed the wake-up


def test_an_exception_in_a_callback_is_logged_and_the_loop_goes_on(caplog):
    reactor = Reactor(clock=FakeClock())
    got = []
    reactor.call_soon(lambda: 1 / 0)
    reactor.call_soon(got.append, "after")
    run_one_pass(reactor)
    assert got == ["after"]
    assert "ZeroDivisionError" in caplog.text


def test_socket_handlers_get_their_events():
    reactor = Reactor()
    left, right = socket.socketpair()
    got = []

    class Handler:
        def on_readable(self):
            got.append(left.recv(10))

    reactor.register(left, READ, Handler())
    right.send(b"ping")
    run_one_pass(reactor)
    assert got == [b"ping"]
    left.close()
    right.close()
