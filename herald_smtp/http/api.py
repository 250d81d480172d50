"""HTTP API: Herald's POST /v1/send, guarded by the API key in the blueprint's before_request.

request JSON -> SendRequest -> Envelope (message.py) -> idempotency -> transport -> envelope JSON.
"""

import hmac
import json
import logging
import re
import time
import uuid

from flask import Blueprint, current_app, g, request

from ..errors import DeliveryUnknown, SendError
from ..logs import mask, send_fields
from ..store.base import StoreUnavailable, fingerprint, run_once
from ..smtp.message import SendRequest
from ..tracing import note_smtp

bp = Blueprint("api", __name__)
log = logging.getLogger("herald_smtp.api")

MAX_KEY_BYTES = 256
_SURROGATE = re.compile("[\ud800-\udfff]")
_STRING_FIELDS = ("channel", "to", "subject", "body", "html", "template", "locale", "idempotency_key")


@bp.before_request
def require_api_key():
    check_api_key(current_app.extensions["herald_smtp"].config.api_keys)


def check_api_key(keys) -> None:
    if not keys:
        return
    given = request.headers.get("X-API-Key", "").encode()
    # Compare against every key, in constant time, so timing tells neither key nor which matched.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key.encode())
    if not given or not matched:
        raise SendError("unauthorized", "missing or invalid X-API-Key")


@bp.post("/v1/send")
def send():
    started = time.monotonic()
    svc = current_app.extensions["herald_smtp"]
    cfg = svc.config
    fields = {"request_id": g.request_id}
    try:
        payload = _json_object()
        req, key, timeout = _send_request(payload, cfg.smtp_timeout_seconds)
        fields["idempotency_key"] = key or None
        envelope = svc.builder.build(req, key)  # validates `to` and the headers first
        fields["to"] = mask(envelope.recipient)
        if not cfg.smtp_configured:
            raise SendError("provider_down", "SMTP is not configured (SMTP_HOST and SMTP_FROM)")
        deadline = started + timeout

        def deliver():
            with svc.tracing.smtp_span(len(envelope.data)):
                try:
                    sent = svc.transport.send(envelope.sender, envelope.recipient, envelope.data, deadline)
                except SendError as err:
                    if err.relay:
                        note_smtp(relay=err.relay)
                    raise
                note_smtp(relay=sent.relay, round_trips=sent.round_trips, bytes_sent=sent.bytes, reused=sent.reused)
            fields["relay"] = sent.relay
            return key or str(uuid.uuid4())

        if key:
            fp = fingerprint({"to": envelope.recipient, "subject": req.subject, "body": req.body, "html": req.html,
                              "params": req.params, "locale": req.locale, "template": req.template})
            try:
                with svc.tracing.store_span():
                    message_id, replayed = run_once(svc.store, key, fp, deadline, deliver,
                                                    cfg.idempotency_lease_seconds, cfg.idempotency_ttl_seconds,
                                                    svc.metrics and svc.metrics.unsaved)
            except StoreUnavailable:
                if not cfg.idempotency_fail_open:
                    raise SendError("provider_down", "idempotency store unavailable; not sending unprotected")
                log.warning("idempotency store unavailable, sending unprotected (IDEMPOTENCY_FAIL_OPEN)",
                            extra={"fields": fields})
                message_id, replayed = deliver(), False
        else:
            message_id, replayed = deliver(), False
    except SendError as err:
        fields.update(error_code=err.code, duration_ms=_ms(started))
        if err.relay:
            fields["relay"] = err.relay
        if isinstance(err, DeliveryUnknown):
            # The server may have the mail: a retry sends a second copy (same Message-ID).
            log.warning("delivery unknown", extra={"fields": fields})
        else:
            log.log(logging.ERROR if err.status >= 500 else logging.INFO, "send failed", extra={"fields": fields})
        if svc.metrics:
            svc.metrics.send(err.code, time.monotonic() - started, unknown=isinstance(err, DeliveryUnknown))
        raise
    if log.isEnabledFor(logging.INFO):
        fields.update(message_id=message_id, replayed=replayed, duration_ms=_ms(started))
        event = "replayed" if replayed else "sent"
        # Under gunicorn the request's access line carries these fields: one line a mail.
        if not send_fields(request.environ, {**fields, "outcome": event}):
            log.info(event, extra={"fields": fields})
    if svc.metrics:
        svc.metrics.send("replayed" if replayed else "sent", time.monotonic() - started)
    return {"ok": True, "message_id": message_id, "provider": "smtp"}


def _ms(started):
    return round((time.monotonic() - started) * 1000, 1)


def _json_object() -> dict:
    if not request.is_json:
        raise SendError("invalid_request", "Content-Type must be application/json", 415)
    raw = request.get_data(cache=False)  # MAX_CONTENT_LENGTH turns an oversize body into 413
    if (request.content_length is None and len(raw) >= request.max_content_length
            and request.environ["wsgi.input"].read(1)):
        # werkzeug stops a chunked body at the limit without refusing it: refuse it here when
        # a byte follows (one of exactly the limit is fine).
        raise SendError("invalid_request", "request body too large", 413)
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise SendError("invalid_request", "body is not valid UTF-8") from None
    except (ValueError, RecursionError):
        raise SendError("invalid_request", "body is not valid JSON") from None
    if not isinstance(obj, dict):
        raise SendError("invalid_request", "body must be a JSON object")
    return obj


def _no_duplicates(pairs):
    obj = dict(pairs)
    if len(obj) != len(pairs):
        # Two parsers could disagree on which value wins; refuse rather than guess.
        raise ValueError("duplicate key")
    return obj


def _no_constant(name):
    raise ValueError(name)  # NaN and Infinity are not JSON


def _send_request(obj: dict, max_timeout: float):
    """Type-check the payload; returns (SendRequest, idempotency key or "", timeout seconds)."""
    values = {}
    for name in _STRING_FIELDS:
        value = obj.get(name)
        if value is not None and not isinstance(value, str):
            raise SendError("invalid_request", f"{name} must be a string")
        values[name] = value or ""
    params = obj.get("params") or {}
    if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
        raise SendError("invalid_request", "params must be an object of strings")
    # JSON escapes can spell lone surrogates ("\ud800"), which no UTF-8 mail or log line can carry.
    if any(_SURROGATE.search(v) for v in (*values.values(), *params.values(), *params)):
        raise SendError("invalid_request", "a string contains an unpaired surrogate escape")
    timeout = obj.get("timeout_seconds")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 0):
        raise SendError("invalid_request", "timeout_seconds must be a non-negative integer")
    key = _idempotency_key(values["idempotency_key"], request.headers.get("Idempotency-Key", ""))
    if values["channel"] not in ("", "email"):
        raise SendError("validation_failed", "unsupported channel; only email is sent here")
    req = SendRequest(to=values["to"], subject=values["subject"], body=values["body"], html=values["html"],
                      params=params, locale=values["locale"], template=values["template"])
    return req, key, min(timeout or max_timeout, max_timeout)


def _idempotency_key(body_key: str, header_key: str) -> str:
    header_key = header_key.strip()
    if body_key and header_key and body_key != header_key:
        raise SendError("invalid_request", "Idempotency-Key header and idempotency_key differ")
    key = body_key or header_key
    if len(key.encode()) > MAX_KEY_BYTES:
        raise SendError("invalid_request", f"idempotency key is longer than {MAX_KEY_BYTES} bytes")
    if not key.isprintable():
        raise SendError("invalid_request", "idempotency key contains a control character")
    return key
