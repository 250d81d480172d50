"""The apps herald-smtp is compared with, served by the same gunicorn.conf.py (same workers,
threads and access log): `gunicorn -c gunicorn.conf.py bench.apps:baseline`.

baseline: a minimal Flask + smtplib relay as most Flask users write it (the Flask-Mail pattern):
a new SMTP connection for every email (greeting, EHLO, MAIL, RCPT, DATA, QUIT), the message
built with EmailMessage. No validation, idempotency store or app logging: less work than ours.
bare: the same route answering without sending, the HTTP ceiling of this gunicorn setup.
floor(writes): herald-smtp itself, its SQLite store cut down to the bare writes of a new key
(bench/idempotency_bench.py --floor): what any store of this layout costs before its own logic;
floor(0) writes nothing, which leaves what a key costs outside the store (fingerprint, checks).
"""

import os
import smtplib
import time
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from flask import Flask, request

from herald_smtp import create_app
from herald_smtp.idempotency import NEW, SQLiteStore

SMTP_HOST = os.environ.get("SMTP_HOST", "127.0.0.1")
SMTP_PORT = int(os.environ.get("SMTP_PORT", "25"))
SMTP_FROM = os.environ.get("SMTP_FROM", "noreply@example.com")


def _app():
    app = Flask(__name__)
    app.get("/healthz")(lambda: {"status": "healthy"})
    return app


baseline = _app()
bare = _app()


@baseline.post("/v1/send")
def send():
    data = request.get_json()
    msg = EmailMessage()
    msg["From"] = SMTP_FROM
    msg["To"] = data["to"]
    msg["Subject"] = data.get("subject") or "Verification code"
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = make_msgid(domain=SMTP_FROM.rpartition("@")[2])  # no getfqdn() per mail
    msg.set_content(data.get("body") or f"Your verification code is: {data['params']['code']}")
    with smtplib.SMTP(SMTP_HOST, SMTP_PORT, timeout=30) as smtp:  # QUIT on leaving
        smtp.send_message(msg)
    return {"ok": True, "message_id": request.headers.get("Idempotency-Key"), "provider": "smtp"}


@bare.post("/v1/send")
def send_nothing():
    request.get_json()
    return {"ok": True, "message_id": request.headers.get("Idempotency-Key"), "provider": "smtp"}


class FloorStore(SQLiteStore):
    """The SQLite store's writes for a new key and nothing else: with writes=1, the INSERT that
    reserves it; with 2, also the UPDATE that completes it; with 0, neither. No capacity check,
    purge or takeover: a yardstick, not a store (a repeated key is sent again)."""

    def __init__(self, path: str, max_entries: int, writes: int):
        super().__init__(path, max_entries)
        self.writes = writes

    def begin(self, key, fp, lease):
        token = os.urandom(16).hex()
        if self.writes:
            self._insert(key, fp, token, time.time() + lease)
        return NEW, None, token

    def complete(self, key, token, message_id, ttl):
        if self.writes == 2:
            super().complete(key, token, message_id, ttl)


def floor(writes: int):
    """herald-smtp with FloorStore on IDEMPOTENCY_STORE's file: `bench.apps:floor(2)`."""
    app = create_app()
    service = app.extensions["herald_smtp"]
    path = service.store.path
    service.store.close()
    service.store = FloorStore(path, service.config.idempotency_max_entries, writes)
    return app
