"""Why the store costs more in the service than in a loop: `.venv/bin/python bench/store_cold.py`.

In one process on one CPU, no gunicorn or HTTP load: the default SQLite store's begin + complete
for a new key, timed (thread CPU time) back to back in a loop, and again with herald-smtp's own
request path run between them (POST /v1/send through Flask's test client, no key, sent to
smtp-sink), as in a worker, where every store call finds the CPU's caches full of the rest of the
request. The request path is timed too, alone and beside the store, since the store's code and
data push the request's out of the caches in turn. Prints the store's cost each way and what it
adds to a request.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.run import Sink, bench_env, ensure_tools, fresh_sqlite, remove_sqlite  # noqa: E402
from herald_smtp import create_app  # noqa: E402
from herald_smtp.store.sqlite import SQLiteStore  # noqa: E402

BODY = '{"to":"user%d@example.com","subject":"Verification code","template":"login","params":{"code":"%06d"}}'


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000, help="requests per measurement (3000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, median of each figure (3)")
    args = parser.parse_args()
    ensure_tools()
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one CPU: its caches are the subject
    path = fresh_sqlite("store-cold")  # in the default store's directory (tmpfs here), as the service keeps it
    with tempfile.TemporaryDirectory(prefix="herald-store-cold-") as tmp:
        sink = Sink(Path(tmp))
        try:
            env = {**bench_env(1, 1), "SMTP_PORT": str(sink.port), "LOG_LEVEL": "error",
                   "IDEMPOTENCY_STORE": "memory://"}  # the app's own store is not measured
            client = create_app(env).test_client()
            store = SQLiteStore(path, 10**9)
            headers = {"Content-Type": "application/json", "X-API-Key": env["API_KEY"]}

            def request(i):
                assert client.post("/v1/send", data=BODY % (i % 1000, i), headers=headers).status_code == 200

            def store_pair(_):
                key = uuid.uuid4().hex
                _, _, token = store.begin(key, "f" * 64, 40)
                store.complete(key, token, key, 300)

            def timed(fn, i):
                started = time.thread_time()
                fn(i)
                return time.thread_time() - started

            rows = {"store alone": [], "store between requests": [], "request alone": [],
                    "request beside the store": []}
            for i in range(200):  # warm-up: SMTP session open, statements prepared
                request(i), store_pair(i)
            for _ in range(args.rounds):
                n = args.requests
                rows["request alone"].append(sum(timed(request, i) for i in range(n)) / n)
                rows["store alone"].append(sum(timed(store_pair, i) for i in range(n)) / n)
                beside = [(timed(request, i), timed(store_pair, i)) for i in range(n)]
                rows["request beside the store"].append(sum(r for r, _ in beside) / n)
                rows["store between requests"].append(sum(s for _, s in beside) / n)
            store.close()
        finally:
            sink.stop()
            remove_sqlite(path)
    med = {k: statistics.median(v) * 1e6 for k, v in rows.items()}
    print(f"herald-smtp store, {args.requests} requests x {args.rounds} rounds, one CPU, median us of thread CPU time")
    for k, v in med.items():
        print(f"  {k:28s} {v:7.1f} us")
    added = med["store between requests"] + med["request beside the store"] - med["request alone"]
    print(f"  the store's begin + complete costs {med['store between requests'] / med['store alone']:.1f}x its loop "
          f"figure between requests; with what it costs the request around it, it adds {added:.1f} us "
          f"({added / med['request alone'] * 100:+.1f}%) to a request")


if __name__ == "__main__":
    main()
