"""What a send costs when the primary relay is down: `.venv/bin/python bench/fallback_cost.py`.

herald-smtp under gunicorn (1 worker x 4 threads, the default cool-down), with smtp-sink as the
fallback relay and a primary that is: healthy (another smtp-sink), refusing connections (a
closed port), or accepting connections and never greeting (a listener that does not answer).
Sequential keyed sends on one keep-alive connection; prints each case's first send and the
median and p99 of the rest, with the primary in cool-down after the first. About 40 seconds.
"""

import argparse
import http.client
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import API_KEY, Gunicorn, Sink, bench_env, ensure_tools, free_port  # noqa: E402


def sends(url_port: int, n: int) -> list:
    conn = http.client.HTTPConnection("127.0.0.1", url_port, timeout=60)
    times = []
    for i in range(n):
        body = json.dumps({"to": f"user{i}@example.com", "params": {"code": f"{i:06d}"}})
        headers = {"Content-Type": "application/json", "X-API-Key": API_KEY, "Idempotency-Key": str(uuid.uuid4())}
        started = time.perf_counter()
        conn.request("POST", "/v1/send", body, headers)
        response = conn.getresponse()
        response.read()
        assert response.status == 200, response.status
        times.append((time.perf_counter() - started) * 1000)
    conn.close()
    return times


def case(name, primary_port, fallback: Sink, args, workdir):
    env = {**bench_env(1, 4), "SMTP_PORT": str(primary_port), "SMTP_TIMEOUT_SECONDS": str(args.timeout),
           "SMTP_FALLBACK_1_HOST": "127.0.0.1", "SMTP_FALLBACK_1_PORT": str(fallback.port),
           "SMTP_FALLBACK_1_USE_STARTTLS": "false"}
    server = Gunicorn("herald", primary_port, workdir, env)
    try:
        times = sends(server.port, args.sends)
    finally:
        server.stop()
    rest = sorted(times[1:])
    print(f"| {name} | {times[0]:.1f} | {statistics.median(rest):.1f} | {rest[int(len(rest) * 0.99)]:.1f} |",
          flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sends", type=int, default=200, help="sequential sends per case (200)")
    parser.add_argument("--timeout", type=float, default=30, help="SMTP_TIMEOUT_SECONDS (30)")
    args = parser.parse_args()
    ensure_tools()
    workdir = Path(tempfile.mkdtemp(prefix="fallback-cost-"))
    primary, fallback = Sink(workdir), Sink(workdir)
    silent = socket.create_server(("127.0.0.1", 0), backlog=64)  # accepts (the kernel does), never greets
    try:
        print(f"{args.sends} sequential sends, SMTP_TIMEOUT_SECONDS={args.timeout:g}; ms\n")
        print("| primary | first send | median of the rest | p99 of the rest |\n|---|---:|---:|---:|")
        case("healthy", primary.port, fallback, args, workdir)
        case("refusing connections", free_port(), fallback, args, workdir)
        case("never greeting", silent.getsockname()[1], fallback, args, workdir)
    finally:
        silent.close()
        primary.stop()
        fallback.stop()
        for f in workdir.iterdir():
            os.remove(f)
        workdir.rmdir()


if __name__ == "__main__":
    main()
