"""The admin API over real HTTP: routes, bad requests (4xx JSON naming the field), the token rule."""
import json
import socket

import pytest

from tests.helpers import wait_for

TOKEN = "s3cret-token"


def test_healthz_readyz_and_upstream_lifecycle(start_pplex, start_worker):
    pplex = start_pplex()
    assert pplex.admin("GET", "/healthz") == (200, {"status": "ok"})
    status, body = pplex.admin("GET", "/readyz")
    assert status == 503 and body["ready_upstreams"] == 0
    worker = start_worker()
    status, added = pplex.admin("POST", "/upstream/add", {"host": "127.0.0.1", "port": worker.port,
                                                          "alive_timeout": 2, "ready_timeout": 1})
    assert status == 201
    assert added["address"] == f"127.0.0.1:{worker.port}" and added["alive_timeout"] == 2
    wait_for(lambda: pplex.admin("GET", "/readyz")[0] == 200, message="/readyz once the worker is ready")
    listed = pplex.upstreams()
    assert [(u["id"], u["state"]) for u in listed] == [(added["id"], "ready")]
    assert pplex.admin("POST", "/upstream/add", {"host": "127.0.0.1", "port": worker.port})[0] == 409
    assert pplex.admin("DELETE", f"/upstreams/{added['id']}") == (200, {"removed": added["id"]})
    assert pplex.upstreams() == []
    assert pplex.admin("DELETE", f"/upstreams/{added['id']}")[0] == 404
    # The original spelling of delete works too.
    status, again = pplex.admin("POST", "/upstream/add", {"host": "127.0.0.1", "port": worker.port})
    assert status == 201
    assert pplex.admin("POST", f"/upstream/delete/{again['id']}")[0] == 200


@pytest.mark.parametrize("body, status, field", [
    ({"host": "127.0.0.1", "port": 70000}, 422, "port"),
    ({"host": "127.0.0.1"}, 422, "port"),
    ({"host": "127.0.0.1", "port": 5000, "alive_timeout": "soon"}, 422, "alive_timeout"),
    ({"host": "127.0.0.1", "port": 5000, "colour": "red"}, 422, "colour"),
])
def test_bad_upstream_bodies_name_the_field(start_pplex, body, status, field):
    pplex = start_pplex()
    got_status, got = pplex.admin("POST", "/upstream/add", body)
    assert got_status == status
    assert got["field"] == field and got["error"].startswith(f"{field}: ")


def test_malformed_requests_are_4xx_json(start_pplex):
    pplex = start_pplex()
    status, body = pplex.admin("POST", "/upstream/add", raw=b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]
    status, body = pplex.admin("POST", "/upstream/add", raw=b"[1, 2]")
    assert status == 400 and "JSON object" in body["error"]
    status, body = pplex.admin("GET", "/nowhere")
    assert status == 404 and body == {"error": "no route GET /nowhere"}
    status, body = pplex.admin("PUT", "/healthz", raw=b"")
    assert status == 405 and "not allowed" in body["error"]
    status, body = pplex.admin("GET", "/connections?limit=many")
    assert status == 400 and body["field"] == "limit"


def test_connections_list_and_close(start_pplex, start_worker):
    worker = start_worker()
    pplex = start_pplex("--upstream", f"127.0.0.1:{worker.port}")
    pplex.wait_ready_upstreams(1)
    clients = [pplex.client() for _ in range(3)]
    clients[0].send(b"hello\n")
    assert clients[0].recv_line() == b"hello"
    wait_for(lambda: pplex.admin("GET", "/connections")[1]["count"] == 3, message="3 connections")
    status, page = pplex.admin("GET", "/connections?limit=2&offset=0")
    assert status == 200 and page["count"] == 3 and len(page["connections"]) == 2
    talker = [c for c in pplex.admin("GET", "/connections")[1]["connections"] if c["bytes_in"] == 6][0]
    assert talker["active"] is True and talker["bytes_out"] == 6 and talker["worker"] == "u1"
    assert talker["remote"].startswith("127.0.0.1:")
    assert pplex.admin("DELETE", f"/connections/{talker['uuid']}")[0] == 200
    assert clients[0].is_closed_by_peer(timeout=5)
    assert pplex.admin("DELETE", f"/connections/{talker['uuid']}")[0] == 404


def test_metrics_and_plugins(start_pplex, start_worker):
    worker = start_worker()
    pplex = start_pplex(config={"upstream": [{"host": "127.0.0.1", "port": worker.port, "alive_timeout": 0.2}]})
    pplex.wait_ready_upstreams(1)
    client = pplex.client()
    client.send(b"counted\n")
    assert client.recv_line() == b"counted"
    wait_for(lambda: pplex.upstreams()[0]["live_rtt_seconds"] is not None, message="a heartbeat answered")
    status, text = pplex.admin("GET", "/metrics")
    assert status == 200
    node = pplex.stats()["node"]  # every sample is labelled with the node's id
    assert f'pplex_connections_open{{node="{node}"}} 1.0' in text
    assert f'pplex_messages_unconfirmed_total{{node="{node}"}} 0.0' in text
    assert f'pplex_messages_in_total{{node="{node}"}} 1.0' in text
    assert (f'pplex_upstream_state{{address="127.0.0.1:{worker.port}",node="{node}",state="ready",'
            f'upstream="u1"}} 1.0') in text
    assert "pplex_upstream_live_rtt_seconds{" in text and "pplex_upstream_ready_probe_seconds{" in text
    status, body = pplex.admin("GET", "/plugins")
    rows = {p["name"]: p for p in body["plugins"]}
    assert rows["rr"]["enabled"] and rows["rr"]["hooks"] == ["pplex_balance", "pplex_configure"]


def test_token_guards_every_route_but_healthz(start_pplex):
    pplex = start_pplex(env={"PPLEX_ADMIN_TOKEN": TOKEN})
    assert pplex.admin("GET", "/healthz")[0] == 200
    for method, path in (("GET", "/upstreams"), ("GET", "/metrics"), ("GET", "/connections"),
                         ("POST", "/upstream/add"), ("GET", "/readyz")):
        status, body = pplex.admin(method, path, raw=b"{}" if method == "POST" else None)
        assert status == 401, path
        assert "bearer token" in body["error"]
        assert pplex.admin(method, path, token="wrong", raw=b"{}" if method == "POST" else None)[0] == 401
    assert pplex.admin("GET", "/upstreams", token=TOKEN) == (200, {"upstreams": []})
    # Bytes that are not UTF-8 in the header are a wrong token (401 JSON), never an error in pplex.
    for header in (b"\xff", b"Bearer " + TOKEN.encode() + b"\xe9", b"Bearer \xc3\x28"):
        with socket.create_connection(("127.0.0.1", pplex.admin_port), timeout=5) as sock:
            sock.sendall(b"GET /upstreams HTTP/1.0\r\nAuthorization: " + header + b"\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split()[1] == b"401" and "bearer token" in json.loads(body)["error"], answer
    assert "Traceback" not in pplex.log()


def test_token_from_config_and_warning_without_token_off_loopback(start_pplex, tmp_path):
    pplex = start_pplex(config={"management_server": {"token": TOKEN}})
    assert pplex.admin("GET", "/upstreams")[0] == 401
    assert pplex.admin("GET", "/upstreams", token=TOKEN)[0] == 200
    exposed = start_pplex("--admin", "0.0.0.0:0")
    assert "no token" in exposed.log()
