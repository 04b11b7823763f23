"""pplex.logs: the JSON formatter, and the extra fields passed through the rate limiter."""
import io
import json
import logging

from pplex.logs import JsonFormatter, RateLimited, configure


def record_of(logger_name="pplex.test", level=logging.WARNING, msg="x %s", args=("y",), exc_info=None,
              **extra):
    record = logging.LogRecord(logger_name, level, __file__, 1, msg, args, exc_info)
    record.__dict__.update(extra)
    return record


def test_a_line_has_the_stable_keys_and_only_the_context_it_was_given():
    line = json.loads(JsonFormatter().format(record_of(uuid="u-1", reason="gone")))
    assert set(line) == {"ts", "level", "logger", "msg", "uuid", "reason"}
    assert (line["level"], line["logger"], line["msg"]) == ("WARNING", "pplex.test", "x y")
    assert line["ts"].endswith("Z") and len(line["ts"]) == len("2026-01-01T00:00:00.000000Z")


def test_a_traceback_stays_on_the_line_as_exc():
    try:
        raise ValueError("boom\non two lines")
    except ValueError:
        import sys
        text = JsonFormatter().format(record_of(exc_info=sys.exc_info()))
    assert "\n" not in text
    line = json.loads(text)
    assert line["exc"].startswith("Traceback") and "ValueError: boom" in line["exc"]


def test_values_that_are_not_json_are_written_as_text():
    line = json.loads(JsonFormatter().format(record_of(msg="%s", args=(object(),), upstream=("h", 1))))
    assert line["upstream"] == "('h', 1)" and line["msg"].startswith("<object")


def test_rate_limited_lines_carry_their_extra_fields():
    stream = io.StringIO()
    logger = logging.getLogger("pplex.test.limited")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    try:
        limiter = RateLimited(interval=60, clock=lambda: 0.0)
        for _ in range(3):
            limiter.warning(logger, "k", "worker %s down", "w1", extra={"upstream": "10.0.0.5:50051"})
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines == [{**lines[0], "msg": "worker w1 down", "upstream": "10.0.0.5:50051"}]


def test_configure_json_routes_uncaught_thread_errors_through_the_log():
    import threading
    stream = io.StringIO()
    saved = (logging.getLogger().handlers[:], logging.getLogger().level, threading.excepthook)
    import sys
    saved_sys = sys.excepthook
    try:
        configure("info", "json", stream=stream)
        thread = threading.Thread(target=lambda: 1 / 0, name="doomed")
        thread.start()
        thread.join()
    finally:
        root = logging.getLogger()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        threading.excepthook = saved[2]
        sys.excepthook = saved_sys
        logging.captureWarnings(False)
    line = json.loads(stream.getvalue().strip())
    assert line["level"] == "CRITICAL" and "doomed" in line["msg"] and "ZeroDivisionError" in line["exc"]
