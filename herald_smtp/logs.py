"""Structured logs: one JSON object a line on stderr.

Callers pass only safe fields (`extra={"fields": {...}}`): a masked recipient, ids, codes,
durations. Never a body, subject, header, key or password.
"""

import contextvars
import json
import logging
import sys
import time

_LEVELS = {"WARN": "WARNING"}
# The trace context of the request this thread is handling: {"trace_id": ..., "span_id": ...}.
_trace = contextvars.ContextVar("herald_smtp_log_trace", default={})


def bind_trace(trace_id: str, span_id: str):
    """Put trace_id and span_id on every line logged until `unbind_trace(token)`."""
    return _trace.set({"trace_id": trace_id, "span_id": span_id})


def unbind_trace(token) -> None:
    _trace.reset(token)


def trace_fields() -> dict:
    return _trace.get()


class JsonFormatter(logging.Formatter):
    def format(self, record):
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        entry.update(trace_fields())
        entry.update(getattr(record, "fields", {}))
        if record.exc_info and record.exc_info[1] is not None:
            # Type and place only: exception text can carry request data.
            exc, tb = record.exc_info[1], record.exc_info[2]
            while tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
            entry["exception"] = type(exc).__name__
            if tb is not None:
                entry["at"] = f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}"
        return json.dumps(entry, ensure_ascii=False, default=str)


def setup(level: str) -> None:
    """Send the `herald_smtp` loggers to stderr as JSON (idempotent: safe per app)."""
    logger = logging.getLogger("herald_smtp")
    logger.setLevel(_LEVELS.get(level, level))
    if not any(getattr(h, "herald_smtp", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        handler.herald_smtp = True
        logger.addHandler(handler)
        logger.propagate = False


def mask(address: str) -> str:
    """`***@example.com`: the domain helps an operator, the local part identifies a person."""
    domain = address.rpartition("@")[2]
    return f"***@{domain}" if domain and "@" in address else "***"
