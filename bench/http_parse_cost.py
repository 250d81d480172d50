"""What reading one request costs the worker: CPU microseconds per Herald-shaped request (the
headers Herald sends, a 160-byte JSON body), whole in one piece, in three ways:
  - herald_smtp.http.worker.RequestReader: h11's framing, then gunicorn's checks and header policy
    (what the worker's main loop does before a thread runs the app);
  - gunicorn's own parser (gunicorn.http.parser.RequestParser, then the body read), what a stock
    gthread worker's thread does;
  - h11 alone (Connection.receive_data and the events up to EndOfMessage).
`.venv/bin/python bench/http_parse_cost.py` (run it on a quiet machine; it prints one line each).
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import h11  # noqa: E402
from gunicorn.config import Config  # noqa: E402
from gunicorn.http.parser import RequestParser  # noqa: E402

from herald_smtp.http.worker import RequestReader, Settings  # noqa: E402

BODY = json.dumps({"channel": "email", "to": "user@example.com", "subject": "Your code",
                   "template": "otp", "locale": "en", "params": {"code": "123456"}}).encode()
REQUEST = (b"POST /v1/send HTTP/1.1\r\nHost: herald-smtp:8084\r\nUser-Agent: Go-http-client/1.1\r\n"
           b"Content-Length: %d\r\nContent-Type: application/json\r\nIdempotency-Key: "
           b"3f1b0c9e-8d52-4a57-b3a4-2f6f0e0c1d2a\r\nX-Api-Key: 0123456789abcdef0123456789abcdef\r\n"
           b"Traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n"
           b"Accept-Encoding: gzip\r\n\r\n" % len(BODY)) + BODY
PEER = ("127.0.0.1", 40000)
SETTINGS = None


def config():
    cfg = Config()
    cfg.set("limit_request_field_size", 4094)  # as gunicorn.conf.py
    cfg.set("limit_request_fields", 32)
    return cfg


def ours(cfg):
    r = RequestReader(SETTINGS, PEER, 65536, 135000)
    assert r.feed(REQUEST) == RequestReader.READY
    r.request.body.read()


def gunicorns(cfg):
    req = next(RequestParser(cfg, iter([REQUEST]), PEER))
    req.body.read()


def h11_alone(cfg):
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(REQUEST)
    while type(conn.next_event()) is not h11.EndOfMessage:
        pass


def per_request_us(fn, cfg, n=20000, repeats=5):
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        for _ in range(n):
            fn(cfg)
        best = min(best, time.process_time() - started)
    return best / n * 1e6


def main():
    global SETTINGS
    cfg = config()
    SETTINGS = Settings(cfg)  # made once per worker
    print(f"one {len(REQUEST)}-byte request, CPU per request (best of 5 x 20000):")
    for name, fn in (("h11 + gunicorn's checks (this worker's main loop)", ours),
                     ("gunicorn's own parser (stock gthread, in a thread)", gunicorns),
                     ("h11 alone", h11_alone)):
        print(f"  {name}: {per_request_us(fn, cfg):.1f} us")


if __name__ == "__main__":
    main()
