"""The exceptions pplex raises on purpose, each carrying a message fit for one log line."""


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
