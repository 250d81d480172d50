"""Operational endpoints: liveness and readiness (no API key: probes carry none), metrics."""

from flask import Blueprint, Response, current_app

from .api import check_api_key

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz():
    return {"status": "healthy", "service": "herald-smtp"}


@bp.get("/readyz")
def readyz():
    """Ready while SMTP is configured and this worker has a relay not in cool-down."""
    svc = current_app.extensions["herald_smtp"]
    if not svc.config.smtp_configured:
        return {"status": "not_ready", "service": "herald-smtp",
                "reason": "SMTP_HOST and SMTP_FROM must be set"}, 503
    if not svc.transport.available():
        return {"status": "not_ready", "service": "herald-smtp",
                "reason": "every SMTP relay failed its last send and is in cool-down"}, 503
    return {"status": "ready", "service": "herald-smtp"}


@bp.get("/metrics")
def metrics():
    svc = current_app.extensions["herald_smtp"]
    if svc.config.metrics_require_api_key:
        check_api_key(svc.config.api_keys)
    body, content_type = svc.metrics.render()
    return Response(body, content_type=content_type)
