"""A bare WSGI app that answers every request with the environ it was given (its strings, and the
body it read), as JSON: what a worker hands an app, compared between workers in test_front.py."""

import json


def app(environ, start_response):
    seen = {k: v for k, v in environ.items() if isinstance(v, str)}
    seen.update({k: environ[k] for k in ("wsgi.multithread", "wsgi.multiprocess", "wsgi.run_once",
                                         "wsgi.input_terminated") if k in environ})
    seen["wsgi.version"] = list(environ["wsgi.version"])
    seen["body"] = environ["wsgi.input"].read().decode("latin-1")
    data = json.dumps(seen).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]
