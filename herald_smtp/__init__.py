"""herald-smtp: Herald's email adapter. `create_app` wires everything in one place."""

import dataclasses
import logging
import re
import uuid
from typing import Mapping

from flask import Flask, g, request
from werkzeug.exceptions import HTTPException

from . import logs
from .config import Config, ConfigError, load_config, server_config
from .errors import SendError, envelope, from_http_status
from .store.base import Evictions
from .store.opener import open_store
from .smtp.message import MessageBuilder
from .tracing import Tracing, for_config as tracing_for
from .smtp.transport import Transport

__all__ = ["create_app", "Config", "ConfigError", "load_config"]

log = logging.getLogger("herald_smtp")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclasses.dataclass
class Service:
    """What the routes use; one per app (per gunicorn worker)."""
    config: Config
    builder: MessageBuilder
    transport: Transport
    store: object
    metrics: object = None
    tracing: Tracing = dataclasses.field(default_factory=Tracing)

    def close(self):
        self.transport.close_all()
        self.store.close()
        self.tracing.shutdown()  # after the last span: flushes what is queued


def create_app(config=None) -> Flask:
    """Build the app. `config`: a Config, an environment mapping, or None for the server's own
    (the gunicorn master's, else the environment and the env file)."""
    if config is None:
        config = server_config()
    elif isinstance(config, Mapping):
        config = load_config(config)
    logs.setup(config.log_level)
    if not config.smtp_configured:
        log.warning("SMTP_HOST or SMTP_FROM is empty: sends answer 503 provider_down until configured")

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.http_body_limit_bytes
    from .metrics import Metrics  # not before: gunicorn.conf.py names PROMETHEUS_MULTIPROC_DIR first

    metrics = Metrics()
    traces = tracing_for(config)
    traces.init_app(app)  # first hooks: every log line of a request then carries its trace ids
    store = open_store(config.idempotency_store, config.idempotency_max_entries, config.sender_scope,
                       Evictions(metrics.evictions.inc), config.idempotency_wait_replicas)
    metrics.watch_store(lambda: store.oldest_success_age(config.idempotency_ttl_seconds), config.idempotency_ttl_seconds)
    app.extensions["herald_smtp"] = Service(
        config=config,
        builder=MessageBuilder(config),
        transport=Transport(config, metrics),
        store=traces.wrap_store(store),
        metrics=metrics,
        tracing=traces,
    )

    from .http.api import bp as api_bp
    from .http.ops import bp as ops_bp

    app.register_blueprint(api_bp)
    app.register_blueprint(ops_bp)
    metrics.init_app(app)

    @app.before_request
    def request_id():
        given = request.headers.get("X-Request-ID", "")
        # Passed through only when it is a plain token: it goes into logs and a header.
        g.request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex

    @app.after_request
    def add_request_id(response):
        response.headers["X-Request-ID"] = g.get("request_id") or uuid.uuid4().hex
        return response

    @app.errorhandler(SendError)
    def send_error(err):
        return envelope(err)

    @app.errorhandler(HTTPException)
    def http_error(err):
        return envelope(from_http_status(err.code, err.description))

    @app.errorhandler(Exception)
    def unexpected(err):
        log.error("unexpected error", exc_info=err, extra={"fields": {"request_id": g.get("request_id")}})
        return envelope(SendError("send_failed", "internal error"))

    return app
