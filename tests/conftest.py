"""Shared fixtures: pplex processes and in-process gRPC workers, cleaned up after each test."""
import pytest

from tests.helpers import GoWorker, PplexProcess, RecordingWorker


@pytest.fixture
def transport():
    """The transport `start_pplex` gives pplex. A module that tests both overrides this with
    `@pytest.fixture(params=TRANSPORTS)`, and each of its tests then runs once per transport."""
    return "h2"


@pytest.fixture
def start_pplex(tmp_path, transport):
    started = []

    def start(*args, config=None, env=None):
        if "--transport" not in args:
            args += ("--transport", transport)
        proc = PplexProcess(tmp_path, *args, config=config, env=env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def start_worker():
    started = []

    def start(worker=None, port=0):
        worker = (worker or RecordingWorker(f"w{len(started)}")).serve(port=port)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop(grace=0)


@pytest.fixture
def go_worker(tmp_path):
    """Start the Go reference worker in a mode: `go_worker("echo")`; stopped by pid afterwards."""
    started = []

    def start(mode, port=None):
        worker = GoWorker(tmp_path, mode, port)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()
