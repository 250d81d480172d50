"""The apps herald-smtp is compared with, served by the same gunicorn.conf.py (same workers,
threads and access log): `gunicorn -c gunicorn.conf.py bench.apps:baseline`.

baseline: a minimal Flask + smtplib relay as most Flask users write it (the Flask-Mail pattern):
a new SMTP connection for every email (greeting, EHLO, MAIL, RCPT, DATA, QUIT), the message
built with EmailMessage. No validation, idempotency store or app logging: less work than ours.
bare: the same route answering without sending, the HTTP ceiling of this gunicorn setup.
"""

import os
import smtplib
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from flask import Flask, request

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
