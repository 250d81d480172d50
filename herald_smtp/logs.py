"""Structured logs: one JSON object a line on stderr, in one schema for every line the service
writes (ours, gunicorn's own and its access log): `ts`, `level`, `logger`, `event`, then fields.

Callers pass only safe fields (`extra={"fields": {...}}`): a masked recipient, ids, codes,
durations. Never a body, subject, header, key or password.
"""

import contextvars
import ipaddress
import json
import logging
import sys
import time

from gunicorn.glogging import Logger

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


_ENCODER = json.JSONEncoder(ensure_ascii=False, default=str)  # json.dumps with options builds one a call
# The request this thread is handling will get an access line from GunicornLogger.access, which
# then carries the send's fields too (see send_fields): set by the worker around each request.
_access_carries_send = contextvars.ContextVar("herald_smtp_access_carries_send", default=False)
SEND_FIELDS = "herald_smtp.send"  # the environ key the send's fields wait under for the access line


def access_carries_send(on: bool):
    """Say that the access line of the request this thread now handles will carry the send's fields
    (returns a token for `access_carries_send_reset`)."""
    return _access_carries_send.set(on)


def access_carries_send_reset(token) -> None:
    _access_carries_send.reset(token)


def send_fields(environ, fields: dict) -> bool:
    """Hand a sent mail's fields to the request's access line, when one will carry them (True);
    else (False) the caller logs them on a line of their own."""
    if not _access_carries_send.get():
        return False
    environ[SEND_FIELDS] = fields
    return True


class JsonFormatter(logging.Formatter):
    _second = (None, "")  # (an integer second, its "2026-11-29T14:37:55"): formatted once a second

    def format(self, record):
        second, prefix = self._second
        if second != int(record.created):
            second = int(record.created)
            prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            JsonFormatter._second = (second, prefix)  # one assignment: threads see old or new, never half
        entry = {
            "ts": f"{prefix}.{int(record.msecs):03d}Z",
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
        return _ENCODER.encode(entry)


def setup(level: str) -> None:
    """Log at `level` from the `herald_smtp` loggers, and write every logger's lines (a library's
    warnings too, and Python's `warnings`) to stderr as JSON. Idempotent: safe per app."""
    logging.getLogger("herald_smtp").setLevel(_LEVELS.get(level, level))
    # No line shows where it was logged from, or which thread or process wrote it: logging then
    # skips walking the caller's frames and asking for those names on every line (the logging
    # HOWTO's "Optimization"). An exception's place comes from its traceback, not from these.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    if not any(getattr(h, "herald_smtp", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        handler.herald_smtp = True
        root.addHandler(handler)
        logging.captureWarnings(True)


def config_error(message: str, at_reload: bool = False) -> None:
    """The one line a bad configuration gets, before or instead of anything else."""
    setup("INFO")
    event = "configuration error at reload: the running configuration stays" if at_reload else "configuration error"
    logging.getLogger("herald_smtp.config").error(event, extra={"fields": {"error": message}})


class GunicornLogger(Logger):
    """gunicorn's error and access logs in our schema, both on stderr with our lines."""

    def _set_handler(self, log, output, fmt, stream=None):
        # gunicorn passes stdout for the access log; one stream keeps every line in order.
        super()._set_handler(log, output, JsonFormatter(), stream=None)

    def access(self, resp, req, environ, request_time):
        """Method, path (no query string), status, size, duration, peer and client address, request
        id; for a mail sent or replayed, the send's fields too (logs.send_fields)."""
        if not self.access_log_enabled:
            return
        status = getattr(resp, "status_code", None) or str(resp.status).split()[0]
        fields = {
            "request_id": next((v for k, v in resp.headers if k.lower() == "x-request-id"), None),
            "method": environ.get("REQUEST_METHOD"),
            "path": environ.get("PATH_INFO"),
            "status": int(status),
            "bytes": getattr(resp, "sent", None),
            "duration_ms": round(request_time.total_seconds() * 1000, 1),
            "remote": environ.get("REMOTE_ADDR"),
            "client": client_address(environ, self.cfg),
        }
        fields.update(environ.get("herald_smtp.trace", {}))  # trace_id, span_id (herald_smtp.tracing)
        send = environ.get(SEND_FIELDS)
        if send:
            for name, value in send.items():
                fields.setdefault(name, value)  # request_id is the same; duration_ms is the request's
        try:
            self.access_log.info("access", extra={"fields": fields})
        except Exception:
            self.exception("failed to write the access log")


def client_address(environ, cfg) -> str:
    """The client's address: the peer's (REMOTE_ADDR), unless the peer is a proxy gunicorn trusts
    (`forwarded_allow_ips`, our FORWARDED_ALLOW_IPS). Then X-Forwarded-For is read from the right,
    since each proxy appends the address it saw, up to the first address that is not a trusted proxy:
    what a client wrote to the left of that is its own claim. Only a parsed IP address is returned."""
    peer = environ.get("REMOTE_ADDR")
    client = peer
    if not _trusted(peer, cfg):
        return client
    for item in reversed(environ.get("HTTP_X_FORWARDED_FOR", "").split(",")):
        try:
            client = str(ipaddress.ip_address(item.strip()))
        except ValueError:
            break  # not an address: nothing further left can be believed
        if not _trusted(client, cfg):
            break
    return client


def _trusted(address, cfg) -> bool:
    """gunicorn's own test for a peer that may set X-Forwarded-* (http/message.py, _ip_in_allow_list)."""
    if "*" in cfg.forwarded_allow_ips:
        return True
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return False
    return any(ip in network for network in cfg.forwarded_allow_networks())


def mask(address: str) -> str:
    """`***@example.com`: the domain helps an operator, the local part identifies a person."""
    domain = address.rpartition("@")[2]
    return f"***@{domain}" if domain and "@" in address else "***"
