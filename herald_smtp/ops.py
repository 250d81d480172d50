"""Operational endpoints: liveness and readiness (no API key: probes carry none)."""

from flask import Blueprint, current_app

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz():
    return {"status": "healthy", "service": "herald-smtp"}


@bp.get("/readyz")
def readyz():
    cfg = current_app.extensions["herald_smtp"].config
    if not cfg.smtp_configured:
        return {"status": "not_ready", "service": "herald-smtp",
                "reason": "SMTP_HOST and SMTP_FROM must be set"}, 503
    return {"status": "ready", "service": "herald-smtp"}
