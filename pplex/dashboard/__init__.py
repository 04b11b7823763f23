"""The operator's dashboard: the page the admin API serves at `/`, and the instance summary it shows.

The page is plain HTML, CSS and JavaScript in this folder (no build step, no
third-party file). It holds no data: its script fetches the admin API's JSON
routes (`/info`, `/upstreams`, `/stats`, `/connections`, `/plugins`) every
second with the same bearer token rule as any client, and computes rates
from counter deltas in the browser. So the files are served to anyone, and
an unauthenticated visitor gets the page shell and a token prompt, nothing more.
"""
import json
import os

import bottle

from pplex import __version__, node
from pplex.connection import format_peer

HERE = os.path.dirname(os.path.abspath(__file__))
FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# The page runs only its own script and talks only to its own origin; nobody may frame it
# (its buttons change upstreams).
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self' data:; form-action 'none'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def install(app):
    """Add `GET /` and `GET /dashboard/<file>` to a Bottle app; the files are read once, here."""
    bodies = {}
    for name in FILES:
        with open(os.path.join(HERE, name), "rb") as handle:
            bodies[name] = handle.read()

    def serve(name):
        if name not in bodies:
            return bottle.HTTPResponse(body=json.dumps({"error": f"no dashboard file {name}"}), status=404,
                                       headers={"Content-Type": "application/json"})
        return bottle.HTTPResponse(body=bodies[name], status=200,
                                   headers={"Content-Type": FILES[name], **HEADERS})

    app.route("/", "GET", lambda: serve("index.html"))
    app.route("/dashboard/<name>", "GET", serve)


def describe_instance(app_state, uptime_seconds):
    """`GET /info`: what this pplex is. Reads only values fixed at startup, so any thread may call it."""
    config = app_state.config
    plugins = app_state.plugins
    slot_of = {name: slot for slot, name in plugins.slot_owner.items()}
    return {
        "version": __version__,
        "transport": config["transport"],
        "uptime_seconds": round(uptime_seconds, 1),
        "node": node.current.id,
        "listen": format_peer(app_state.listen_address) if app_state.listen_address else None,
        "admin": format_peer(app_state.admin_address) if app_state.admin_address else None,
        "plugins": [{"name": name, "slot": slot_of.get(name)} for name in plugins.names()],
        "pid": os.getpid(),
    }
