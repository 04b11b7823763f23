"""The dashboard in a real browser: Debian's headless Chromium, Playwright, real pplex and real workers.

Each test checks what a person sees on the page (rows, states, counts,
prompts) while real clients and workers come and go, and what the buttons do
to the running proxy. A screenshot of one state (two workers, one ready and
one down, clients talking) is saved under tests/artifacts/.
"""
import os
import re
import threading

import pytest
from playwright.sync_api import expect

from tests.browser import chromium
from tests.helpers import ROOT, wait_for

ARTIFACTS = os.path.join(ROOT, "tests", "artifacts")
TOKEN = "dash-s3cret"
BUSY_RATE = re.compile(r"^(?!0\.0$)[\d.]+k?$")  # a rate shown, and not zero


@pytest.fixture(scope="module")
def browser():
    with chromium() as context:
        yield context


@pytest.fixture
def page(browser):
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(error))
    yield page
    page.close()
    assert not errors, f"the page's script failed: {errors}"


def open_dashboard(page, pplex):
    page.goto(f"http://127.0.0.1:{pplex.admin_port}/")
    return page


def worker_state(page, upstream_id):
    return page.locator(f'#workers tr[data-key="{upstream_id}"] .state')


class Chatter:
    """Clients that each send a line and read the echo every 50 ms, until stopped (at most 60 s)."""

    def __init__(self, clients):
        self.clients = clients
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        for _ in range(1200):
            if self.stop_event.wait(0.05):
                return
            for client in self.clients:
                client.send(b"hello dashboard\n")
                client.recv_line()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        self.thread.join(10)


def test_worker_rows_follow_a_killed_worker_and_its_return_and_the_client_count_follows_clients(
        start_pplex, start_worker, page):
    first, second = start_worker(), start_worker()
    second_port = second.port
    pplex = start_pplex("--upstream", f"127.0.0.1:{first.port}", "--upstream", f"127.0.0.1:{second_port}")
    pplex.wait_ready_upstreams(2)
    open_dashboard(page, pplex)
    expect(worker_state(page, "u1")).to_have_text("ready")
    expect(worker_state(page, "u2")).to_have_text("ready")
    expect(page.locator("#workers-summary")).to_have_text("2 of 2 ready")

    clients = [pplex.client() for _ in range(3)]
    expect(page.locator("#clients-open")).to_have_text("3")
    expect(page.locator("#connections tbody tr[data-key]")).to_have_count(3)
    clients.pop().close()
    expect(page.locator("#clients-open")).to_have_text("2")

    second.stop(grace=0)
    expect(worker_state(page, "u2")).to_have_text("unready")
    expect(worker_state(page, "u2")).to_have_class("state unready")
    expect(page.locator('#workers tr[data-key="u2"] td.error')).not_to_be_empty()
    expect(page.locator("#workers-summary")).to_have_text("1 of 2 ready")
    with Chatter(clients + [pplex.client() for _ in range(3)]):
        expect(page.locator("#rate-messages-in")).not_to_have_text("–")
        expect(page.locator('#workers tr[data-key="u1"] td').nth(5)).to_have_text(BUSY_RATE)
        wait_for(lambda: page.evaluate("document.querySelectorAll('#connections tbody tr[data-key]').length") == 5,
                 timeout=10, message="5 client rows")
        os.makedirs(ARTIFACTS, exist_ok=True)
        path = os.path.join(ARTIFACTS, "dashboard.png")
        page.wait_for_timeout(3000)  # let the charts draw a few seconds of traffic for the picture
        page.screenshot(path=path, full_page=True)
        print(f"\ndashboard screenshot: {path}")

    start_worker(port=second_port)
    expect(worker_state(page, "u2")).to_have_text("ready")
    expect(page.locator("#workers-summary")).to_have_text("2 of 2 ready")


def test_drain_remove_close_add_and_search_act_on_the_proxy(start_pplex, start_worker, page):
    workers = [start_worker() for _ in range(3)]
    pplex = start_pplex(*[arg for w in workers[:2] for arg in ("--upstream", f"127.0.0.1:{w.port}")])
    pplex.wait_ready_upstreams(2)
    clients = [pplex.client() for _ in range(3)]
    open_dashboard(page, pplex)
    expect(page.locator("#connections tbody tr[data-key]")).to_have_count(3)

    page.locator('#workers tr[data-key="u1"] button[data-action="drain"]').click()
    expect(page.locator("#notice")).to_contain_text("u1 is draining")
    expect(page.locator('#workers tr[data-key="u1"]')).to_have_count(0)
    assert [u["id"] for u in pplex.upstreams()] == ["u2"]

    answers = iter([False, True])
    page.on("dialog", lambda dialog: dialog.accept() if next(answers) else dialog.dismiss())
    remove = page.locator('#workers tr[data-key="u2"] button[data-action="remove"]')
    remove.click()  # dismissed: nothing happens
    expect(page.locator('#workers tr[data-key="u2"]')).to_have_count(1)
    assert [u["id"] for u in pplex.upstreams()] == ["u2"]
    remove.click()  # accepted
    expect(page.locator('#workers tr[data-key="u2"]')).to_have_count(0)
    expect(page.locator("#workers tbody")).to_contain_text("no workers")
    assert pplex.upstreams() == []

    form = page.locator("#add-worker")
    form.locator("[name=host]").fill("127.0.0.1")
    form.locator("[name=port]").fill("70000")
    form.locator("button").click()
    expect(page.locator("#notice")).to_have_text("port: port must be between 1 and 65535")
    form.locator("[name=port]").fill(str(workers[2].port))
    form.locator("[name=alive_timeout]").fill("2")
    form.locator("button").click()
    expect(worker_state(page, "u3")).to_have_text("ready")
    assert pplex.upstreams()[0]["alive_timeout"] == 2

    uuids = [c["uuid"] for c in pplex.admin("GET", "/connections")[1]["connections"]]
    page.locator("#search").fill(uuids[1][:13])
    expect(page.locator("#connections tbody tr[data-key]")).to_have_count(1)
    expect(page.locator("#page-label")).to_have_text("1–1 of 1 matching (3 open)")
    page.locator(f'#connections tr[data-key="{uuids[1]}"] button[data-action="close"]').click()
    expect(page.locator("#notice")).to_contain_text(f"connection {uuids[1]} closed")
    expect(page.locator("#clients-open")).to_have_text("2")
    closed = [c for c in clients if c.is_closed_by_peer(timeout=0.2)]
    assert len(closed) == 1
    page.locator("#search").fill("")
    expect(page.locator("#connections tbody tr[data-key]")).to_have_count(2)


def test_a_wrong_token_shows_the_login_and_no_data(start_pplex, start_worker, page):
    worker = start_worker()
    pplex = start_pplex("--upstream", f"127.0.0.1:{worker.port}", env={"PPLEX_ADMIN_TOKEN": TOKEN})
    wait_for(lambda: pplex.admin("GET", "/readyz", token=TOKEN)[0] == 200, timeout=10, message="a ready worker")
    client = pplex.client()
    status, shell = pplex.admin("GET", "/")
    assert status == 200 and "<main" in shell and str(worker.port) not in shell
    assert pplex.admin("GET", "/upstreams")[0] == 401

    open_dashboard(page, pplex)
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#dashboard")).to_be_hidden()
    page.locator("#token").fill("not-the-token")
    page.locator("#login-form button").click()
    expect(page.locator("#login-message")).to_have_text("Wrong token: the admin API refused it.")
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#dashboard")).to_be_hidden()
    assert page.locator("#workers tbody tr").count() == 0
    assert page.locator("#connections tbody tr").count() == 0
    assert str(worker.port) not in page.content() and page.title() == "pplex"

    page.locator("#token").fill(TOKEN)
    page.locator("#login-form button").click()
    expect(page.locator("#login")).to_be_hidden()
    expect(worker_state(page, "u1")).to_have_text("ready")
    expect(page.locator("#clients-open")).to_have_text("1")
    page.reload()  # asked once: the tab keeps the token
    expect(worker_state(page, "u1")).to_have_text("ready")
    expect(page.locator("#login")).to_be_hidden()
    client.close()


def test_page_files_info_and_connection_search_routes(start_pplex, start_worker):
    worker = start_worker()
    pplex = start_pplex("--upstream", f"127.0.0.1:{worker.port}", "--plugins", "framing_line")
    pplex.wait_ready_upstreams(1)
    for path, kind in (("/dashboard/app.js", "javascript"), ("/dashboard/style.css", "css")):
        status, text = pplex.admin("GET", path)
        assert status == 200 and len(text) > 100, path
    assert pplex.admin("GET", "/dashboard/secrets.txt")[0] == 404
    assert pplex.admin("GET", "/dashboard/../admin.py")[0] == 404
    status, info = pplex.admin("GET", "/info")
    assert status == 200 and info["transport"] == "h2" and info["version"]
    assert info["node"] == pplex.stats()["node"]  # this process's node id, as /stats says
    assert info["uptime_seconds"] >= 0 and info["listen"] == f"127.0.0.1:{pplex.port}"
    assert {"name": "framing_line", "slot": "framing"} in info["plugins"]
    clients = [pplex.client() for _ in range(3)]
    wait_for(lambda: pplex.admin("GET", "/connections")[1]["count"] == 3, message="3 connections")
    port = clients[2].sock.getsockname()[1]
    status, page = pplex.admin("GET", f"/connections?q=127.0.0.1:{port}")
    assert status == 200 and page["count"] == 3 and page["matched"] == 1
    assert page["connections"][0]["remote"] == f"127.0.0.1:{port}"
    status, page = pplex.admin("GET", "/connections?q=no-such-client")
    assert page["matched"] == 0 and page["connections"] == []
    status, body = pplex.admin("GET", "/connections?q=" + "x" * 101)
    assert status == 400 and body["field"] == "q"
