"""What tracing costs per request: `.venv/bin/python bench/tracing_bench.py`.

In one run, herald-smtp under its own gunicorn.conf.py (same workers and threads each time),
sending to Postfix's smtp-sink, loaded by wrk with a unique Idempotency-Key per request on the
default SQLite store (a fresh file per run), in these variants:
  - base: the code at --base (its files, from git archive), from before tracing existed,
  - off: this checkout with OTLP_ENABLED=false (the default), no traceparent,
  - off + traceparent: the same, every request carrying a traceparent (its ids go into the logs),
  - on: OTLP_ENABLED=true exporting to a local OTLP/HTTP receiver (a subprocess that answers 200
    to every POST), every request carrying a traceparent: 3 spans a request, batched.
in interleaved rounds (order rotating), median of each; overheads are the median of each round's
own ratio to base. Prints req/s, p50, p99 and the gunicorn workers' CPU time per request, which the
noise of a shared machine moves less than req/s. For the steadiest figures, run one pinned worker:
WEB_CONCURRENCY=1 .venv/bin/python bench/tracing_bench.py --pin --connections 8
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.idempotency_bench import CPUS, fresh_sqlite, load, load_options, remove_sqlite  # noqa: E402
from bench.run import Sink, free_port, prepare, stop  # noqa: E402

VARIANTS = {"base": "base commit (no tracing code)", "off": "tracing off", "off_tp": "tracing off + traceparent",
            "on": "tracing on, exporting"}
# A receiver that takes every export and answers an empty ExportTraceServiceResponse.
RECEIVER = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *a):
        pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def one_run(variant, args, workdir, env, base_dir):
    """Fresh sink, store, receiver and gunicorn; warm-up, then the measured wrk run."""
    sqlite = fresh_sqlite("trace-bench")
    sink, receiver = Sink(workdir), None
    port = free_port()
    genv = {**env, "PORT": f"127.0.0.1:{port}", "SMTP_PORT": str(sink.port), "IDEMPOTENCY_STORE": f"sqlite://{sqlite}"}
    if variant == "on":
        collector = free_port()
        receiver = subprocess.Popen([sys.executable, "-c", RECEIVER, str(collector)])
        if args.pin:
            os.sched_setaffinity(receiver.pid, {CPUS[-1]})  # beside wrk, off the worker's CPU
        genv.update(OTLP_ENABLED="true", OTLP_ENDPOINT=f"http://127.0.0.1:{collector}")
    log = workdir / f"gunicorn-{variant}-{port}.log"
    try:
        result = load("app:app", genv, log, args, sink, keyed=True, traced=variant in ("off_tp", "on"),
                      cwd=base_dir if variant == "base" else ROOT)
    finally:
        sink.stop()
        if receiver:
            stop(receiver)
        remove_sqlite(sqlite)
    return result


def off_path():
    """The off path alone, CPU us a request, in a loop in this process: Tracing's hooks, its empty
    span contexts, and two log lines' trace fields."""
    from herald_smtp import create_app, logs
    from herald_smtp.tracing import note_smtp

    app = create_app({"SMTP_HOST": "127.0.0.1", "SMTP_FROM": "a@example.com", "IDEMPOTENCY_STORE": "memory://",
                      "WEB_CONCURRENCY": "1", "OTLP_ENABLED": "false"})
    tracing = app.extensions["herald_smtp"].tracing

    def request():
        tracing._start()
        with tracing.store_span(), tracing.smtp_span(100):
            note_smtp(reused=True)
        logs.trace_fields(), logs.trace_fields()
        tracing._end(None)

    for label, headers in (("without traceparent", {}),
                           ("with traceparent", {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})):
        with app.test_request_context("/v1/send", method="POST", headers=headers):
            best = []
            for _ in range(5):
                started = time.process_time()
                for _ in range(100000):
                    request()
                best.append((time.process_time() - started) * 10)  # us per call
            print(f"tracing off, a request {label}: {min(best):.1f} us of CPU (best of 5 x 100000)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="578126a", help="the commit to compare with (578126a: before tracing)")
    load_options(parser, duration=5)
    parser.add_argument("--off-path", action="store_true", help="only time the off path in a loop (seconds)")
    args = parser.parse_args()
    if args.off_path:
        return off_path()

    workers, threads, env = prepare(args)
    rounds = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="herald-trace-bench-") as tmp:
        workdir, base_dir = Path(tmp), Path(tmp) / "base"
        base_dir.mkdir()
        # The base commit's files only (git archive): no worktree registered in the repository.
        archive = subprocess.run(["git", "archive", args.base], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base_dir)], input=archive, check=True)
        names = list(VARIANTS)
        for i in range(args.rounds):
            for v in names[i % len(names):] + names[:i % len(names)]:
                print(f"round {i + 1}/{args.rounds}: {VARIANTS[v]}", flush=True)
                rounds[v].append(one_run(v, args, workdir, env, base_dir))

    print()
    print(f"herald-smtp tracing cost, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, commit "
          f"{subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True).stdout.strip()}"
          f" against {args.base}")
    print(f"Command: .venv/bin/python bench/tracing_bench.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"wrk -t1 -c{args.connections}, {args.duration} s per run after {args.warmup} s warm-up, median of "
          f"{args.rounds} interleaved rounds; gunicorn gthread {workers} workers x {threads} threads"
          f"{', pinned' if args.pin else ''}; smtp-sink; a unique Idempotency-Key per request, default SQLite store.")
    print()
    print("| variant | req/s | p50 ms | p99 ms | vs base (req/s) | worker CPU ms/req | vs base (CPU) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for v, rs in rounds.items():
        r = {k: statistics.median(x[k] for x in rs) for k in ("rps", "p50_ms", "p99_ms", "cpu_ms")}
        # Cost is 1 / req/s at saturation: the overhead is how much longer a request takes.
        cost = statistics.median(b["rps"] / x["rps"] - 1 for b, x in zip(rounds["base"], rs))
        cpu = statistics.median(x["cpu_ms"] / b["cpu_ms"] - 1 for b, x in zip(rounds["base"], rs))
        print(f"| {VARIANTS[v]} | {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{'-' if v == 'base' else f'{cost * 100:+.1f}%'} | {r['cpu_ms']:.3f} | "
              f"{'-' if v == 'base' else f'{cpu * 100:+.1f}%'} |")
    for v, rs in rounds.items():
        print(f"{VARIANTS[v]}, req/s by round: " + ", ".join(f"{x['rps']:.0f}" for x in rs))

if __name__ == "__main__":
    main()
