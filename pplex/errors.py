"""The exceptions pplex raises on purpose, each carrying a message fit for one log line, and `shown`,
which puts any value a config parser can make into such a line."""
import json


class ConfigError(Exception):
    """A bad setting: the message names its path, e.g. `upstream[1].port: ...`. Startup exits 2."""


class FrameError(Exception):
    """A framing plugin met input it cannot cut into messages; that client is closed."""


class DuplicateUpstream(Exception):
    """An upstream at the same address is already registered."""


class AdminRefusal(Exception):
    """An admin request that cannot be served as asked: the HTTP status and a JSON error body."""

    def __init__(self, status, message, **extra):
        super().__init__(message)
        self.status = status
        self.body = {"error": message, **extra}


def shown(value, limit=300):
    """`value` as an error line shows it, whatever a JSON or TOML parser made of the file.

    JSON text where JSON can say it; a TOML date or time as TOML writes it (json.dumps would raise);
    an integer too long for Python to print as such; anything longer than `limit` cut short.
    """
    if hasattr(value, "isoformat"):
        return value.isoformat()
    try:
        text = json.dumps(value, default=lambda inner: inner.isoformat() if hasattr(inner, "isoformat")
                          else repr(inner))
    except ValueError:   # an int of more than sys.get_int_max_str_digits() digits
        return "a number too long to show"
    return text if len(text) <= limit else text[:limit - 3] + "..."
