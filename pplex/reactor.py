"""The event loop: one thread, one selector, one timer heap, one wake-up socket.

Owns readiness dispatch for nonblocking sockets, deadlines (a heap of timers
with lazy cancellation), work queued from other threads, and the end-of-pass
callbacks through which the proxy flushes what one pass of the loop produced
(one batch per upstream, one write per client) instead of once per message.

It knows sockets and callbacks, never messages. Anything registered with it is
called only from the loop thread; other threads reach it only through
`call_soon_threadsafe`, which costs one wake-up byte per burst, not per call.
"""
import collections
import heapq
import logging
import select as select_module
import selectors
import socket
import threading
import time

from pplex import limits
from pplex.logs import FAULTS

log = logging.getLogger("pplex.reactor")

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE

# A select() never sleeps longer than this, so a stop request from a signal
# handler that could not write the wake-up byte is still seen promptly.
MAX_SELECT_SECONDS = 1.0
# A callback that holds the loop longer than this is logged: it delays every client.
SLOW_CALLBACK_SECONDS = 0.1


class _SelectorPoller:
    """Readiness through `selectors` (any platform): (handler, mask) pairs."""

    def __init__(self, selector=None):
        self.selector = selector or selectors.DefaultSelector()

    def register(self, sock, events, handler):
        self.selector.register(sock, events, handler)

    def modify(self, sock, events, handler):
        self.selector.modify(sock, events, handler)

    def unregister(self, sock):
        self.selector.unregister(sock)

    def poll(self, timeout):
        return [(key.data, mask) for key, mask in self.selector.select(timeout)]

    def close(self):
        self.selector.close()


class _EpollPoller:
    """Readiness straight from epoll (Linux): the same interface as `_SelectorPoller`.

    `selectors.EpollSelector` looks up a key and translates the mask in Python for
    every ready socket; at tens of thousands of events a second that is a few per
    cent of pplex's CPU (profiled), so on Linux the reactor keeps its own fd ->
    handler table. The masks are translated the way selectors does: an error or
    hang-up wakes both the reader and the writer.
    """

    _IN, _OUT = select_module.EPOLLIN, select_module.EPOLLOUT

    def __init__(self):
        self.epoll = select_module.epoll()
        self.handlers = {}   # fd -> handler
        self.socks = {}      # fd -> socket, to find a socket closed before it was unregistered

    def _mask(self, events):
        return (self._IN if events & READ else 0) | (self._OUT if events & WRITE else 0)

    def register(self, sock, events, handler):
        fd = sock.fileno()
        if fd in self.handlers:
            raise KeyError(f"{sock!r} is already registered")
        self.epoll.register(fd, self._mask(events))
        self.handlers[fd] = handler
        self.socks[fd] = sock

    def modify(self, sock, events, handler):
        fd = sock.fileno()
        if fd not in self.handlers:
            raise KeyError(f"{sock!r} is not registered")
        self.epoll.modify(fd, self._mask(events))
        self.handlers[fd] = handler

    def unregister(self, sock):
        fd = sock.fileno()
        if fd < 0:  # closed first: find it by the socket object
            fd = next((f for f, known in self.socks.items() if known is sock), -1)
            self.handlers.pop(fd, None)
            self.socks.pop(fd, None)
            return
        if self.handlers.pop(fd, None) is None:
            raise KeyError(f"{sock!r} is not registered")
        self.socks.pop(fd, None)
        try:
            self.epoll.unregister(fd)
        except OSError:
            pass  # closed behind our back: the kernel dropped it already

    def poll(self, timeout):
        handlers = self.handlers
        notin, notout = ~self._IN, ~self._OUT
        ready = []
        for fd, event in self.epoll.poll(timeout):
            handler = handlers.get(fd)
            if handler is not None:
                ready.append((handler, (READ if event & notout else 0) | (WRITE if event & notin else 0)))
        return ready

    def close(self):
        self.epoll.close()


class Timer:
    """A scheduled call; `cancel()` marks it, the heap drops it when it surfaces."""

    __slots__ = ("when", "seq", "fn", "args", "cancelled", "_reactor")

    def __init__(self, when, seq, fn, args, reactor):
        self.when = when
        self.seq = seq
        self.fn = fn
        self.args = args
        self.cancelled = False
        self._reactor = reactor

    def __lt__(self, other):
        return (self.when, self.seq) < (other.when, other.seq)

    def cancel(self):
        if not self.cancelled:
            self.cancelled = True
            self.fn = self.args = None
            self._reactor._timer_cancelled()


class Reactor:
    """Runs handlers for ready sockets, due timers and queued calls, in one thread.

    A registered handler is any object with `on_readable()` and/or
    `on_writable()`; the selector hands it back with each event, so dispatch is
    one attribute lookup and one call.
    """

    def __init__(self, selector=None, clock=time.monotonic):
        """`selector`: a `selectors` selector to use instead of epoll (tests, other platforms)."""
        self.clock = clock
        if selector is None and hasattr(select_module, "epoll"):
            self._selector = _EpollPoller()
        else:
            self._selector = _SelectorPoller(selector)
        self._timers = []
        self._timer_seq = 0
        self._cancelled_timers = 0
        self._soon = collections.deque()
        self._threadsafe = collections.deque()
        self._pass_end = []
        self._last = []          # calls for the very end of this pass only (call_at_pass_end)
        self._running = False
        self._thread_id = None
        # The wake-up pair: another thread writes one byte, the loop wakes.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._wake_pending = False
        self._threadsafe_left = False   # the last drain stopped at its per-pass bound
        self._selector.register(self._wake_r, READ, _WakeHandler(self))

    # -- sockets -------------------------------------------------------------
    def register(self, sock, events, handler):
        self._selector.register(sock, events, handler)

    def modify(self, sock, events, handler):
        self._selector.modify(sock, events, handler)

    def unregister(self, sock):
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    # -- calls ---------------------------------------------------------------
    def call_soon(self, fn, *args):
        """Run fn(*args) on the next pass (loop thread only)."""
        self._soon.append((fn, args))

    def call_soon_threadsafe(self, fn, *args):
        """Run fn(*args) on the loop thread; safe from any thread.

        deque.append is atomic; the wake byte is written only when no wake-up
        is already pending, so a burst of calls costs one system call.
        """
        self._threadsafe.append((fn, args))
        if not self._wake_pending:
            self._wake_pending = True
            try:
                self._wake_w.send(b"\0")
            except (BlockingIOError, InterruptedError):
                pass  # the buffer is full of wake bytes: the loop will wake anyway
            except OSError:
                pass  # closed during shutdown

    def call_later(self, delay, fn, *args):
        return self.call_at(self.clock() + delay, fn, *args)

    def call_at(self, when, fn, *args):
        self._timer_seq += 1
        timer = Timer(when, self._timer_seq, fn, args, self)
        heapq.heappush(self._timers, timer)
        return timer

    def add_pass_end(self, fn):
        """Call fn() after every pass, once the pass's events and calls ran."""
        self._pass_end.append(fn)

    def call_at_pass_end(self, fn, *args):
        """Call fn(*args) once, at the end of this pass, after every `add_pass_end` callback
        (loop thread only): how a socket writes once per pass what the pass produced for it."""
        self._last.append((fn, args))

    def in_loop_thread(self):
        return threading.get_ident() == self._thread_id

    def _timer_cancelled(self):
        self._cancelled_timers += 1
        # Rebuild when most of the heap is dead weight, so a churn of
        # connections that each cancel an idle timer cannot grow it unbounded.
        if self._cancelled_timers > 64 and self._cancelled_timers * 2 > len(self._timers):
            self._timers = [t for t in self._timers if not t.cancelled]
            heapq.heapify(self._timers)
            self._cancelled_timers = 0

    # -- loop ----------------------------------------------------------------
    def stop(self):
        """Ask the loop to end after the current pass (safe from any thread)."""
        self._running = False
        self.call_soon_threadsafe(_noop)

    def run(self):
        self._running = True
        self._thread_id = threading.get_ident()
        select = self._selector.poll
        timers = self._timers
        clock = self.clock
        try:
            while self._running:
                timeout = MAX_SELECT_SECONDS
                if self._soon or self._threadsafe_left or self._last:
                    timeout = 0
                elif self._timers:
                    timers = self._timers
                    head = timers[0]
                    timeout = min(max(head.when - clock(), 0), MAX_SELECT_SECONDS)
                try:
                    ready = select(timeout)
                except (OSError, ValueError):
                    # A socket closed under the selector; its owner unregisters it. Never end the loop.
                    FAULTS.report("reactor select", "select() failed", logger=log)
                    ready = ()
                if self._threadsafe_left:
                    self._drain_threadsafe()
                for handler, mask in ready:
                    try:
                        if mask & READ:
                            handler.on_readable()
                        if mask & WRITE:
                            handler.on_writable()
                    except Exception:
                        self._report(handler, "socket event")
                self._run_timers()
                self._run_soon()
                for fn in self._pass_end:
                    try:
                        fn()
                    except Exception:
                        self._report(fn, "end of pass")
                if self._last:
                    last, self._last = self._last, []
                    for fn, args in last:
                        try:
                            fn(*args)
                        except Exception:
                            self._report(fn, "end of pass")
        finally:
            self._running = False

    def _run_timers(self):
        timers = self._timers
        now = self.clock()
        while timers and timers[0].when <= now:
            timer = heapq.heappop(timers)
            if timer.cancelled:
                self._cancelled_timers -= 1
                continue
            fn, args = timer.fn, timer.args
            timer.cancelled = True  # fired: a later cancel() is a no-op
            timer.fn = timer.args = None
            self._call(fn, args)
            timers = self._timers  # a rebuild in a callback replaces the list

    def _run_soon(self):
        # Only what was queued before this pass runs now; calls queued by
        # these callbacks wait for the next pass, so nothing starves select().
        soon = self._soon
        for _ in range(len(soon)):
            fn, args = soon.popleft()
            self._call(fn, args)

    def _drain_threadsafe(self):
        self._wake_pending = False  # before draining: a call appended later re-arms the wake byte
        queue = self._threadsafe
        # These may be per message: time the whole drain, not each call; and run at most
        # a bounded number per pass, so sockets and timers are served between floods.
        start = self.clock()
        count = 0
        bound = limits.THREADSAFE_CALLS_PER_PASS
        while queue and count < bound:
            fn, args = queue.popleft()
            count += 1
            try:
                fn(*args)
            except Exception:
                self._report(fn, "callback")
        self._threadsafe_left = bool(queue)
        took = self.clock() - start
        if took > SLOW_CALLBACK_SECONDS:
            log.warning("%d queued calls held the loop for %.3f s", count, took)

    def _call(self, fn, args):
        start = self.clock()
        try:
            fn(*args)
        except Exception:
            self._report(fn, "callback")
        took = self.clock() - start
        if took > SLOW_CALLBACK_SECONDS:
            log.warning("slow callback %r held the loop for %.3f s", fn, took)

    def _report(self, what, where):
        FAULTS.report("reactor " + where, "%r", what, logger=log)

    def close(self):
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()


class _WakeHandler:
    __slots__ = ("reactor",)

    def __init__(self, reactor):
        self.reactor = reactor

    def on_readable(self):
        try:
            while self.reactor._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        self.reactor._drain_threadsafe()


def _noop():
    pass
