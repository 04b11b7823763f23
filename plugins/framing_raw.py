"""Raw framing (default): each read is one message; replies are written as they are.

Raw TCP has no message boundaries to keep, so bytes a client sends while its
previous message still waits for its stream join that message (`merges`).
"""
from pplex import hookimpl


class RawFraming:
    merges = True

    @staticmethod
    def decode(conn, data):
        return (data,)

    @staticmethod
    def encode(payload):
        return payload


@hookimpl
def pplex_framing():
    return RawFraming()
