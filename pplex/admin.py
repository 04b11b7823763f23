"""The admin HTTP API: a Bottle app served by Waitress on its own threads.

Owns the routes, their JSON in and out, request validation (voluptuous) and
the bearer-token rule. It never touches proxy state from its own threads:
every read or change runs on the reactor thread through `Control.call`.
"""
import hmac
import json
import logging
import threading

import bottle
import voluptuous
import waitress

from pplex.config import describe_invalid, loads_json, validate_upstream
from pplex.errors import DuplicateUpstream

log = logging.getLogger("pplex.admin")

CALL_TIMEOUT_SECONDS = 5.0
MAX_PAGE = 1000
OPEN_ROUTES = {"/healthz"}


class Control:
    """Runs functions on the reactor thread for the admin threads, and waits for their result."""

    def __init__(self, reactor):
        self.reactor = reactor

    def call(self, fn, *args):
        done = threading.Event()
        box = {}

        def run():
            try:
                box["result"] = fn(*args)
            except BaseException as error:  # handed back to the admin thread
                box["error"] = error
            done.set()

        self.reactor.call_soon_threadsafe(run)
        if not done.wait(CALL_TIMEOUT_SECONDS):
            raise HTTPError(503, "the proxy loop did not answer in time")
        if "error" in box:
            raise box["error"]
        return box["result"]


class HTTPError(Exception):
    def __init__(self, status, message, **extra):
        super().__init__(message)
        self.status = status
        self.body = {"error": message, **extra}


def _json_body():
    raw = bottle.request.body.read()
    if not raw:
        raise HTTPError(400, "expected a JSON object as the request body")
    try:
        body = loads_json(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise HTTPError(400, f"request body is not valid JSON: {error}")
    if not isinstance(body, dict):
        raise HTTPError(400, "expected a JSON object as the request body")
    return body


def _int_param(name, default, low, high):
    text = bottle.request.query.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise HTTPError(400, f"{name}: expected an integer", field=name)
    if not low <= value <= high:
        raise HTTPError(400, f"{name}: must be between {low} and {high}", field=name)
    return value


def build_app(app_state, token=None, metrics=None):
    """The Bottle app. `app_state` is the running `pplex.app.App` (proxy, control, plugins)."""
    app = bottle.Bottle(catchall=False)
    proxy = app_state.proxy
    control = app_state.control

    def route(path, method="GET", status=200):
        def register(handler):
            def wrapped(**kwargs):
                try:
                    _check_token(path)
                    result = handler(**kwargs)
                except HTTPError as error:
                    return _respond(error.status, error.body)
                if isinstance(result, bottle.HTTPResponse):
                    return result
                return _respond(status, result)
            app.route(path, method, wrapped)
            return handler
        return register

    def _check_token(path):
        if token is None or path in OPEN_ROUTES:
            return
        given = bottle.request.get_header("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise HTTPError(401, "missing or wrong bearer token (Authorization: Bearer <token>)")

    @route("/healthz")
    def healthz():
        return {"status": "ok"}

    @route("/readyz")
    def readyz():
        ready = control.call(lambda: len(proxy.ready))
        if not ready:
            raise HTTPError(503, "no upstream worker is ready", ready_upstreams=0)
        return {"status": "ready", "ready_upstreams": ready}

    def add_upstream():
        body = _json_body()
        try:
            spec = validate_upstream(body)
        except voluptuous.MultipleInvalid as error:
            first = error.errors[0]
            raise HTTPError(422, describe_invalid(first), field=".".join(str(p) for p in first.path))
        try:
            upstream = control.call(proxy.upstreams.add, spec["host"], spec["port"],
                                    spec["alive_timeout"], spec["ready_timeout"], spec.get("tls"))
        except DuplicateUpstream as error:
            raise HTTPError(409, str(error))
        return control.call(upstream.as_dict)

    route("/upstream/add", "POST", status=201)(add_upstream)
    route("/upstreams", "POST", status=201)(add_upstream)

    @route("/upstreams")
    def list_upstreams():
        return {"upstreams": control.call(lambda: [u.as_dict() for u in proxy.upstreams])}

    def delete_upstream(upstream_id):
        removed = control.call(proxy.upstreams.remove, upstream_id, "removed through the admin API")
        if removed is None:
            raise HTTPError(404, f"no upstream {upstream_id}")
        return {"removed": upstream_id}

    route("/upstreams/<upstream_id>", "DELETE")(delete_upstream)
    route("/upstream/delete/<upstream_id>", "POST")(delete_upstream)

    @route("/upstreams/<upstream_id>/drain", "POST")
    def drain_upstream(upstream_id):
        upstream = control.call(proxy.upstreams.drain, upstream_id)
        if upstream is None:
            raise HTTPError(404, f"no upstream {upstream_id}")
        return upstream

    @route("/connections")
    def list_connections():
        limit = _int_param("limit", 100, 0, MAX_PAGE)
        offset = _int_param("offset", 0, 0, 1 << 62)

        def page():
            now = proxy.reactor.clock()
            conns = list(proxy.conns.values())[offset:offset + limit]
            return {"count": len(proxy.conns), "offset": offset, "limit": limit,
                    "connections": [proxy.connection_info(c, now) for c in conns]}
        return control.call(page)

    @route("/connections/<uuid>", "DELETE")
    def close_connection(uuid):
        def close():
            conn = proxy.conns.get(uuid)
            if conn is None:
                return False
            proxy.close(conn, "closed through the admin API")
            return True
        if not control.call(close):
            raise HTTPError(404, f"no connection {uuid}")
        return {"closed": uuid}

    @route("/plugins")
    def plugins():
        return {"plugins": app_state.plugins.describe()}

    @route("/stats")
    def stats():
        return control.call(lambda: proxy.stats.snapshot(proxy.conns.values()))

    @route("/metrics")
    def metrics_text():
        if metrics is None:
            raise HTTPError(404, "metrics are not enabled")
        body, content_type = metrics()
        return bottle.HTTPResponse(body=body, status=200, headers={"Content-Type": content_type})

    def json_error(error):
        status = error.status_code
        messages = {404: f"no route {bottle.request.method} {bottle.request.path}",
                    405: f"method {bottle.request.method} not allowed on {bottle.request.path}"}
        message = messages.get(status) or (error.body if isinstance(error.body, str) and error.body
                                           else bottle.HTTP_CODES.get(status, "error"))
        if status >= 500:
            log.error("admin request %s %s failed: %s", bottle.request.method, bottle.request.path,
                      error.exception or message)
            message = "internal error; see the pplex log"
        bottle.response.content_type = "application/json"
        return json.dumps({"error": message})

    for status in (400, 404, 405, 413, 500):
        app.error(status)(json_error)
    return app


def _respond(status, body):
    return bottle.HTTPResponse(body=json.dumps(body), status=status,
                               headers={"Content-Type": "application/json"})


class AdminServer:
    """Waitress serving the admin app on its own threads."""

    def __init__(self, app, host, port, threads=4):
        try:
            self.server = waitress.create_server(app, host=host, port=port, threads=threads,
                                                 ident="pplex", clear_untrusted_proxy_headers=True)
        except OSError as error:
            raise OSError(error.errno, f"admin API cannot listen on {host}:{port}: {error.strerror}") from None
        self.address = (host, self.server.effective_port)
        self.thread = threading.Thread(target=self._run, name="pplex-admin", daemon=True)

    def _run(self):
        try:
            self.server.run()
        except OSError:
            pass  # closed during shutdown

    def start(self):
        self.thread.start()
        return self.address

    def close(self):
        self.server.close()
