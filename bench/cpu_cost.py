"""CPU per keyed request against a bare Flask endpoint: `.venv/bin/python bench/cpu_cost.py`.

One gunicorn worker (WEB_CONCURRENCY=1, WEB_THREADS threads), the project's gunicorn.conf.py and
worker class (herald_smtp.http.worker.ThreadWorker) for both:
  - keyed: herald-smtp (app:app) at LOG_LEVEL=info, a unique Idempotency-Key per request on the
    default SQLite store (a fresh file per run), validation and metrics as deployed, sending to
    Postfix's smtp-sink on loopback; every 200 must be a mail the sink counted;
  - bare: bench/apps.py:bare, a Flask route that reads the JSON body and returns a small JSON answer;
  - with --before REV, also herald-smtp as it was at REV (its files, from git archive), to measure
    a change in the same rounds;
  - with --floor, also herald-smtp with every guarantee off but the send (unguarded() below): no
    key, no validation of `to`, no app log lines, no metrics: the floor of this design.
wrk (bench/send.lua) drives each on keep-alive connections; the worker process's CPU time
(/proc/<pid>/stat, user + system) over the measured run, divided by the requests answered, is its
CPU per request. Variants run back to back in each round, order rotating; the ratio is computed
within a round, and the median of the rounds' ratios is the figure. measure() returns the figures (for make bench).
Run it under the CPU lock on a shared machine: `flock /tmp/herald-cpu.lock .venv/bin/python bench/cpu_cost.py`.
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
from bench.idempotency_bench import load  # noqa: E402
from bench.run import Sink, bench_env, commit, fresh_sqlite, free_port, remove_sqlite  # noqa: E402

LABELS = {"keyed": "keyed POST /v1/send (SQLite store, info logs, metrics)", "bare": "bare Flask endpoint",
          "before": "keyed, at --before", "unguarded": "floor: no key, validation, app logs or metrics"}
TARGETS = {"bare": "bench.apps:bare", "unguarded": "bench.cpu_cost:unguarded()"}


def unguarded():
    """herald-smtp sending with every guarantee off: no validation of `to`, no metrics (and, from
    one_run, no Idempotency-Key and LOG_LEVEL=error): `gunicorn ... 'bench.cpu_cost:unguarded()'`."""
    from herald_smtp import create_app
    from herald_smtp.metrics import Metrics
    from herald_smtp.smtp import message

    message.recipient = lambda to: to
    for name in ("send", "connection", "relay", "init_app"):
        setattr(Metrics, name, lambda *args, **kwargs: None)
    return create_app()


def one_run(variant, args, workdir, env, before_dir):
    """Fresh sink, store and gunicorn; warm-up, then the measured run: its CPU us per request."""
    sqlite = fresh_sqlite("cpu-cost")
    sink = Sink(workdir)
    port = free_port()
    genv = {**env, "PORT": f"127.0.0.1:{port}", "SMTP_PORT": str(sink.port), "IDEMPOTENCY_STORE": f"sqlite://{sqlite}"}
    if variant == "unguarded":
        genv["LOG_LEVEL"] = "error"
    log = workdir / f"gunicorn-{variant}-{port}.log"
    try:
        result = load(TARGETS.get(variant, "app:app"), genv, log, args, sink, keyed=variant != "unguarded",
                      cwd=before_dir if variant == "before" else ROOT)
        delivered = sink.messages()
    finally:
        sink.stop()
        remove_sqlite(sqlite)
    if variant != "bare":  # every 200 is a mail the sink took (the bare route sends none)
        ok = sum('"path": "/v1/send"' in line and '"status": 200' in line for line in log.read_text().splitlines())
        if ok == 0 or ok != delivered:
            raise RuntimeError(f"{variant}: {ok} answered 200, {delivered} counted by the sink (see {log})")
    result["cpu_us"] = result.pop("cpu_ms") * 1000
    return result


def measure(rounds=5, duration=5, warmup=2, connections=0, pin=False, before=None, floor=False, threads=None,
            log=print) -> dict:
    """Interleaved rounds of the variants; returns {"rounds": [{variant: cpu_us, ...}, ...],
    "ratio": [keyed / bare per round], "median_ratio", "median_us": {variant: median}, ...}.
    With `before` (a git revision) also "before" per round, "before_ratio" and "change"
    (keyed / before per round); with `floor`, "unguarded" per round and "floor_ratio"."""
    threads = threads or int(os.environ.get("WEB_THREADS") or 8)
    args = argparse.Namespace(duration=duration, warmup=warmup, connections=connections or threads, pin=pin)
    env = bench_env(1, threads)
    names = ["keyed", "bare"] + (["before"] if before else []) + (["unguarded"] if floor else [])
    per_round = []
    with tempfile.TemporaryDirectory(prefix="herald-cpu-cost-") as tmp:
        workdir, before_dir = Path(tmp), Path(tmp) / "before"
        if before:
            before_dir.mkdir()
            archive = subprocess.run(["git", "archive", before], cwd=ROOT, check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(before_dir)], input=archive, check=True)
        for i in range(rounds):
            got = {}
            for v in names[i % len(names):] + names[:i % len(names)]:
                got[v] = one_run(v, args, workdir, env, before_dir)["cpu_us"]
            per_round.append(got)
            log(f"round {i + 1}/{rounds}: " + ", ".join(f"{v} {got[v]:.0f} us" for v in names) +
                f"; keyed / bare {got['keyed'] / got['bare']:.2f}x" +
                (f"; before / bare {got['before'] / got['bare']:.2f}x; keyed / before {got['keyed'] / got['before']:.3f}"
                 if before else "") + (f"; floor / bare {got['unguarded'] / got['bare']:.2f}x" if floor else ""))
    out = {"rounds": per_round, "threads": threads, "connections": args.connections, "duration": duration,
           "pin": pin, "before": before, "commit": commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "median_us": {v: statistics.median(r[v] for r in per_round) for v in names},
           "ratio": [r["keyed"] / r["bare"] for r in per_round]}
    out["median_ratio"] = statistics.median(out["ratio"])
    if before:
        out["before_ratio"] = [r["before"] / r["bare"] for r in per_round]
        out["median_before_ratio"] = statistics.median(out["before_ratio"])
        out["change"] = [r["keyed"] / r["before"] for r in per_round]
        out["median_change"] = statistics.median(out["change"])
    if floor:
        out["floor_ratio"] = [r["unguarded"] / r["bare"] for r in per_round]
        out["median_floor_ratio"] = statistics.median(out["floor_ratio"])
    return out


def render(r) -> str:
    names = [v for v in LABELS if v in r["median_us"]]
    lines = [f"CPU per request: one gunicorn worker (ThreadWorker) x {r['threads']} threads, wrk -t1 "
             f"-c{r['connections']}, {r['duration']} s per run, {len(r['rounds'])} interleaved rounds"
             f"{', pinned' if r['pin'] else ''}; smtp-sink on loopback; commit {r['commit']}"
             + (f", before = {r['before']}" if r["before"] else "") + ".", "",
             "| round | " + " | ".join(f"{LABELS[v]} us" for v in names) + " | keyed / bare |"
             + (" before / bare | keyed / before |" if r["before"] else "")
             + (" floor / bare |" if "floor_ratio" in r else ""),
             "|---|" + "---:|" * (len(names) + 1 + (2 if r["before"] else 0) + ("floor_ratio" in r))]
    for i, x in enumerate(r["rounds"]):
        lines.append(f"| {i + 1} | " + " | ".join(f"{x[v]:.0f}" for v in names) + f" | {r['ratio'][i]:.2f}x |"
                     + (f" {r['before_ratio'][i]:.2f}x | {r['change'][i]:.3f} |" if r["before"] else "")
                     + (f" {r['floor_ratio'][i]:.2f}x |" if "floor_ratio" in r else ""))
    lines.append("| median | " + " | ".join(f"{r['median_us'][v]:.0f}" for v in names) +
                 f" | {r['median_ratio']:.2f}x |"
                 + (f" {r['median_before_ratio']:.2f}x | {r['median_change']:.3f} |" if r["before"] else "")
                 + (f" {r['median_floor_ratio']:.2f}x |" if "floor_ratio" in r else ""))
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (5)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per measured wrk run (5)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of wrk before each measured run (2)")
    parser.add_argument("--connections", type=int, default=0, help="wrk connections (WEB_THREADS, 8)")
    parser.add_argument("--pin", action="store_true", help="pin the worker, wrk and the sink to CPUs")
    parser.add_argument("--before", metavar="REV", help="also measure herald-smtp at this git revision")
    parser.add_argument("--floor", action="store_true", help="also measure herald-smtp with every guarantee off")
    args = parser.parse_args()
    r = measure(args.rounds, args.duration, args.warmup, args.connections, args.pin, args.before, args.floor)
    print()
    print(f"Command: .venv/bin/python bench/cpu_cost.py {' '.join(sys.argv[1:])}".rstrip())
    print(render(r))


if __name__ == "__main__":
    main()
