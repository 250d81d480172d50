"""The apps herald-smtp is compared with, served by the same gunicorn.conf.py (same workers,
threads and access log): `gunicorn -c gunicorn.conf.py bench.apps:baseline`.

baseline: a minimal Flask + smtplib relay as most Flask users write it by hand: a new SMTP
connection for every email (greeting, EHLO, MAIL, RCPT, DATA, QUIT), the message built with
EmailMessage. No validation, idempotency store or app logging: less work than ours.
flaskmail: the same relay written with Flask-Mail as its docs show (`Mail(app)`, `Message(...)`,
`mail.send(msg)`): the peer a user would pick, also one SMTP connection per send, the message
built with email.mime. It checks X-API-Key as Herald's requests need; a failed send is Flask's
plain 500, not the contract's envelope (the benchmark never sees one). With SMTP_USE_STARTTLS=true
it does what Flask-Mail does per mail (MAIL_USE_TLS, MAIL_USERNAME): connect, EHLO, STARTTLS, EHLO,
AUTH, then the mail; its STARTTLS verifies the server against SMTP_CA_FILE (Flask-Mail's own
starttls() takes no context and verifies nothing, so a user who wants it overrides configure_host).
bare: the same route answering without sending, the HTTP ceiling of this gunicorn setup.
floor(writes): herald-smtp itself, its SQLite store cut down to the bare writes of a new key
(bench/idempotency_bench.py --floor): what any store of this layout costs before its own logic;
floor(0) writes nothing, which leaves what a key costs outside the store (fingerprint, checks).
"""

import hmac
import os
import smtplib
import ssl
import time
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from flask import Flask, request
from flask_mail import Connection, Mail, Message

from herald_smtp import create_app
from herald_smtp.store.base import NEW
from herald_smtp.store.sqlite import SQLiteStore

SMTP_HOST = os.environ.get("SMTP_HOST", "127.0.0.1")
SMTP_PORT = int(os.environ.get("SMTP_PORT", "25"))
SMTP_FROM = os.environ.get("SMTP_FROM", "noreply@example.com")
API_KEY = os.environ.get("API_KEY", "")
STARTTLS = os.environ.get("SMTP_USE_STARTTLS", "false").lower() == "true"


def _app():
    app = Flask(__name__)
    app.get("/healthz")(lambda: {"status": "healthy"})
    return app


baseline = _app()
bare = _app()
flaskmail = _app()
flaskmail.config.update(MAIL_SERVER=SMTP_HOST, MAIL_PORT=SMTP_PORT, MAIL_DEFAULT_SENDER=SMTP_FROM, MAIL_USE_TLS=STARTTLS,
                        MAIL_USERNAME=os.environ.get("SMTP_USER") or None,
                        MAIL_PASSWORD=os.environ.get("SMTP_PASSWORD") or None)


class VerifyingConnection(Connection):
    """Flask-Mail's connection, its STARTTLS verifying the server's certificate."""

    context = ssl.create_default_context(cafile=os.environ.get("SMTP_CA_FILE") or None)

    def configure_host(self):
        host = smtplib.SMTP(self.mail.server, self.mail.port)
        if self.mail.use_tls:
            host.starttls(context=self.context)
        if self.mail.username and self.mail.password:
            host.login(self.mail.username, self.mail.password)
        return host


class VerifyingMail(Mail):
    def connect(self):
        return VerifyingConnection(self.app.extensions["mail"])


mail = VerifyingMail(flaskmail)


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


@flaskmail.post("/v1/send")
def send_with_flask_mail():
    if not hmac.compare_digest(request.headers.get("X-API-Key", ""), API_KEY):
        return {"ok": False, "error_code": "unauthorized", "error_message": "invalid API key"}, 401
    data = request.get_json()
    code = (data.get("params") or {}).get("code")
    msg = Message(subject=data.get("subject") or "Verification code", recipients=[data["to"]],
                  body=data.get("body") or f"Your verification code is: {code}")
    mail.send(msg)  # connect, EHLO, MAIL, RCPT, DATA, QUIT
    return {"ok": True, "message_id": request.headers.get("Idempotency-Key") or msg.msgId, "provider": "smtp"}


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

    def begin(self, key, fp, lease, deadline=None):
        token = os.urandom(16).hex()
        if self.writes:
            self._insert(key, fp, token, time.time() + lease)
        return NEW, None, token

    def complete(self, key, token, message_id, ttl, deadline=None):
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


class RedisFloorStore:
    """The Redis store's round trips and nothing else: a PING where each script (and its WAIT)
    would go, down the same pooled connection. What two round trips to Redis cost a request,
    before the store's own logic and scripts."""

    def __init__(self, store):
        self.store = store

    def begin(self, key, fp, lease, deadline=None):
        self.store._round_trip(self.store.client, [("PING",)])
        return NEW, None, "t"

    def complete(self, key, token, message_id, ttl, deadline=None):
        self.store._round_trip(self.store.client, [("PING",)])

    def __getattr__(self, name):  # fail, get, close, oldest_success_age: the real store's
        return getattr(self.store, name)


def redis_floor():
    """herald-smtp with RedisFloorStore on IDEMPOTENCY_STORE's Redis: `bench.apps:redis_floor()`."""
    app = create_app()
    service = app.extensions["herald_smtp"]
    service.store = RedisFloorStore(service.store)
    return app
