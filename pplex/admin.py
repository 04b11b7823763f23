"""The admin HTTP API: a Bottle app served by Waitress on its own threads.

Owns the routes, their JSON in and out, request validation (voluptuous) and
the bearer-token rule. It never touches proxy state from its own threads:
every read or change runs on the reactor thread through `Control.call`.

Every answer is JSON, errors included, whatever the request's bytes: a bad
request gets a 4xx naming what is wrong (Waitress's own refusals, such as a
body above `management_server.max_body_bytes` or a malformed request line,
are rewritten as JSON too); a handler that raises is a fault boundary (the
error is counted and logged, the answer is a JSON 500 with no traceback).
Waitress runs with poll(), not select(), so descriptors above 1023 (a proxy
with thousands of clients) are fine, and it pauses accepting when the
process is out of file descriptors instead of spinning.
"""
import errno
import hmac
import json
import logging
import threading
import time

import bottle
import voluptuous
import waitress.adjustments
import waitress.channel
import waitress.server
import waitress.task

from pplex import admin_cluster, dashboard
from pplex.config import describe_invalid, is_number, loads_json, validate_upstream
from pplex.errors import AdminRefusal, DuplicateUpstream
from pplex.logs import FAULTS, RateLimited

log = logging.getLogger("pplex.admin")

CALL_TIMEOUT_SECONDS = 5.0
MAX_PAGE = 1000
MAX_QUERY_CHARS = 100  # GET /connections?q=: a uuid is 36, an address at most ~47
MAX_GROUP_QUERY_CHARS = 65535  # GET /groups?q=: a part of a group name (server.max_group_name_bytes at most)
OPEN_ROUTES = {"/healthz"}
MAX_HEADER_BYTES = 64 * 1024
# At exit, answers still being written get this long to go out.
CLOSE_GRACE_SECONDS = 1.0
# Out of file descriptors: the admin listener pauses this long before accepting again.
ACCEPT_RETRY_SECONDS = 0.25
_limited = RateLimited()


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
    except RecursionError:
        raise HTTPError(400, "request body is not valid JSON: nested too deeply")
    if not isinstance(body, dict):
        raise HTTPError(400, "expected a JSON object as the request body")
    return body


def _int_param(name, default, low, high):
    text = bottle.request.query.get(name)
    if text is None or text == "":
        return default
    if not is_number(text, 18):  # ASCII digits only: int() also takes " 3", "1_0" and "٣"
        raise HTTPError(400, f"{name}: expected a whole number of at most 18 digits", field=name)
    value = int(text)
    if not low <= value <= high:
        raise HTTPError(400, f"{name}: must be between {low} and {high}", field=name)
    return value


def build_app(app_state, token=None, metrics=None, max_body_bytes=64 * 1024):
    """The Bottle app. `app_state` is the running `pplex.app.App` (proxy, control, plugins)."""
    app = bottle.Bottle()
    app.config["catchall"] = False
    proxy = app_state.proxy
    control = app_state.control
    started = time.monotonic()
    dashboard.install(app)  # GET / and its files: the page shell only, no data, so no token

    def route(path, method="GET", status=200):
        def register(handler):
            def wrapped(**kwargs):
                try:
                    _check_token(path)
                    _check_body_size()
                    result = handler(**kwargs)
                except (HTTPError, AdminRefusal) as error:
                    return _respond(error.status, error.body)
                except UnicodeError:  # Bottle decodes the path, query and headers as UTF-8 when asked
                    return _respond(400, {"error": "the request has bytes that are not valid UTF-8"})
                except Exception:
                    # The fault boundary of an admin handler: counted, logged, a JSON 500.
                    FAULTS.report("admin handler", "%s %s", bottle.request.method, bottle.request.path,
                                  logger=log)
                    return _respond(500, {"error": "internal error; see the pplex log"})
                if isinstance(result, bottle.HTTPResponse):
                    return result
                return _respond(status, result)
            app.route(path, method, wrapped)
            return handler
        return register

    def _check_body_size():
        # Waitress refuses larger bodies before the app runs; this covers what it cannot see.
        length = bottle.request.content_length
        if length > max_body_bytes:
            raise HTTPError(413, f"request body of {length} bytes is above management_server.max_body_bytes "
                                 f"({max_body_bytes})")

    def _check_token(path):
        if token is None or path in OPEN_ROUTES:
            return
        # The raw header (WSGI hands it over as latin-1 text): compared as bytes, so any byte in it is a
        # wrong token (401), never a decoding error.
        given = bottle.request.environ.get("HTTP_AUTHORIZATION", "").encode("latin-1", "replace")
        scheme, _, value = given.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(value.strip(), token.encode()):
            raise HTTPError(401, "missing or wrong bearer token (Authorization: Bearer <token>)")

    @route("/healthz")
    def healthz():
        return {"status": "ok"}

    @route("/readyz")
    def readyz():
        ready, shutting_down = control.call(lambda: (len(proxy.ready), proxy.shutting_down))
        if shutting_down:
            raise HTTPError(503, "shutting down: not accepting clients", ready_upstreams=ready)
        if not ready:
            raise HTTPError(503, "no upstream worker is ready", ready_upstreams=0)
        return {"status": "ready", "ready_upstreams": ready, **admin_cluster.readiness(app_state)}

    def add_upstream():
        body = _json_body()
        try:
            spec = validate_upstream(body, proxy.config["server"])
        except voluptuous.Invalid as error:
            first = error.errors[0] if isinstance(error, voluptuous.MultipleInvalid) else error
            raise HTTPError(422, describe_invalid(first), field=".".join(str(p) for p in first.path))
        try:
            upstream = control.call(proxy.upstreams.add, spec)
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
        query = bottle.request.query.get("q", "").strip().lower()
        if len(query) > MAX_QUERY_CHARS:
            raise HTTPError(400, f"q: at most {MAX_QUERY_CHARS} characters", field="q")
        return admin_cluster.connections(app_state, limit, offset, bottle.request.query.get("scope"), query)

    @route("/connections/<uuid>")
    def get_connection(uuid):
        return admin_cluster.connection(app_state, uuid)

    @route("/connections/<uuid>", "DELETE")
    def close_connection(uuid):
        return admin_cluster.connection(app_state, uuid, close=True)

    @route("/groups")
    def list_groups():
        limit = _int_param("limit", 100, 0, MAX_PAGE)
        offset = _int_param("offset", 0, 0, 1 << 62)
        query = bottle.request.query.get("q", "")
        if len(query) > MAX_GROUP_QUERY_CHARS:
            raise HTTPError(400, f"q: at most {MAX_GROUP_QUERY_CHARS} characters", field="q")

        def page():
            matched, rows = proxy.groups.page(offset, limit, query)
            return {"count": len(proxy.groups), "matched": matched, "offset": offset, "limit": limit,
                    "groups": [{"name": name, "members": members} for name, members in rows]}
        return control.call(page)

    @route("/shutdown", "POST", status=202)
    def shutdown():
        clients = control.call(app_state.start_shutdown)
        server = proxy.config["server"]
        return {"status": "shutting down" if clients is not None else "already shutting down",
                "clients": clients, "shutdown_spread": server["shutdown_spread"],
                "shutdown_grace": server["shutdown_grace"]}

    @route("/cluster")
    def cluster():
        return admin_cluster.cluster_view(app_state)

    @route("/plugins")
    def plugins():
        return {"plugins": app_state.plugins.describe()}

    @route("/info")
    def info():
        return dashboard.describe_instance(app_state, time.monotonic() - started)

    @route("/stats")
    def stats():
        return admin_cluster.stats(app_state, bottle.request.query.get("scope"))

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
            FAULTS.report("admin handler", "%s %s: %s", bottle.request.method, bottle.request.path,
                          error.exception or message, logger=log)
            message = "internal error; see the pplex log"
        bottle.response.content_type = "application/json"
        return json.dumps({"error": message})

    for status in (400, 404, 405, 413, 500):
        app.error(status)(json_error)
    return app


def _respond(status, body):
    return bottle.HTTPResponse(body=json.dumps(body), status=status,
                               headers={"Content-Type": "application/json"})


class _JsonErrorTask(waitress.task.ErrorTask):
    """Waitress's own refusals (bad request line, headers or body too large) as JSON."""

    def execute(self):
        error = self.request.error
        body = json.dumps({"error": f"{error.reason}: {error.body}" if error.body else error.reason}).encode()
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _Channel(waitress.channel.HTTPChannel):
    error_task_class = _JsonErrorTask


class _Server(waitress.server.TcpWSGIServer):
    """Waitress's TCP server, pausing its accepts when the process is out of file descriptors.

    Waitress logs a traceback and tries again at once: with the listener still
    readable, that is a busy loop writing thousands of lines a second.
    """

    channel_class = _Channel
    paused_until = 0.0

    def readable(self):
        wanted = super().readable()  # first, always: it also closes idle channels (which frees descriptors)
        if self.paused_until and time.monotonic() < self.paused_until:
            return False
        return wanted

    def handle_accept(self):
        try:
            pair = self.accept()
        except OSError as error:
            if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self.paused_until = time.monotonic() + ACCEPT_RETRY_SECONDS
                _limited.warning(log, "admin accept", "admin API cannot accept: %s; retrying every %.2f s",
                                 error.strerror or error, ACCEPT_RETRY_SECONDS)
                return
            return  # a connection reset before it was accepted: nothing to do
        self.paused_until = 0.0
        if pair is None:
            return
        conn, addr = pair
        try:
            self.set_socket_options(conn)
        except OSError:
            conn.close()
            return
        self.channel_class(self, conn, self.fix_addr(addr), self.adj, map=self._map)


class AdminServer:
    """Waitress serving the admin app on its own threads."""

    def __init__(self, app, host, port, threads=4, max_body_bytes=64 * 1024, connection_limit=1000, idle_timeout=10):
        # channel_timeout closes connections idle for idle_timeout seconds (a half-sent request too);
        # waitress checks every cleanup_interval, so that runs often enough for the timeout to hold.
        adjustments = waitress.adjustments.Adjustments(
            host=host, port=port, threads=threads, ident="pplex", clear_untrusted_proxy_headers=True,
            asyncore_use_poll=True, max_request_body_size=max_body_bytes,
            max_request_header_size=MAX_HEADER_BYTES, log_socket_errors=False,
            connection_limit=connection_limit, channel_timeout=idle_timeout,
            cleanup_interval=max(1, idle_timeout / 4))
        dispatcher = waitress.server.ThreadedTaskDispatcher()
        dispatcher.set_thread_count(adjustments.threads)
        try:
            self.server = _Server(app, map={}, dispatcher=dispatcher, adj=adjustments,
                                  sockinfo=adjustments.listen[0])
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

    def close(self, grace=CLOSE_GRACE_SECONDS):
        """Stop serving; answers being written (POST /shutdown's own) get up to `grace` seconds to go out."""
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(
                channel.requests or channel.total_outbufs_len
                for channel in list(self.server.active_channels.values())):
            time.sleep(0.01)  # the loop thread writes them; nothing to wait on but their state
        self.server.close()
        self.server.task_dispatcher.shutdown(timeout=1)
