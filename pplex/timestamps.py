"""RFC 3339 UTC timestamps with microseconds, as pplex stamps messages."""
import time


def rfc3339_now():
    now = time.time()
    seconds = int(now)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + ".%06dZ" % int((now - seconds) * 1e6)
