"""What callers without the API key can do to Herald's sends: `make hostile`, or
`.venv/bin/python bench/hostile.py [--row NAME ...] [--short]`.

herald-smtp under its own gunicorn.conf.py with the defaults (workers x threads from config.py,
the default SQLite store), sending to Postfix's smtp-sink. In every row a legitimate client sends
one keyed mail at a time, each on a new connection: first on the quiet service (its p50 is the
row's "quiet p50"), then while hostile clients, all without the key, do what the row says (ROWS
below, or --help).
Each row prints what it measured against its target, PASS or FAIL, and checks that every mail
answered 200 reached the sink. The clients: bench/hostile_clients.py. Tables: bench/results/
hostile.md and hostile.json. Exit status 1 when a target is missed.
"""

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench import hostile_clients as clients  # noqa: E402
from bench.run import API_KEY, SMTP_SINK, Gunicorn, Sink, bench_env, commit, percentile, worker_pids  # noqa: E402
from herald_smtp.config import load_config  # noqa: E402

SLOWHTTPTEST = "slowhttptest"
ROWS = {
    "quiet": "nothing hostile: the baseline",
    "flood": "150 new connections a second for 6 s that never send a byte",
    "drip": "30 clients, each a POST /v1/send with a chunked body in 1-byte chunks, 300 bytes on the wire "
            "every 10 ms, never ending",
    "pipeline": "20 clients writing request after request and never reading an answer",
    "slowloris": "slowhttptest -H: 400 connections at 100 a second, headers never finished, 15 s",
    "slowbody": "slowhttptest -B: 400 connections at 100 a second, POST /v1/send with a body never finished, 15 s",
    "slowread": "slowhttptest -X: 400 connections at 100 a second, GET /healthz 3 times each, read a few bytes "
                "at a time, 15 s",
    "bigcl": "20 requests with a 5000-digit Content-Length, one after another",
    "burst": "not hostile: 200 keep-alive connections opened at once, one keyed send each, against herald-smtp and "
             "against stock gthread (the same app, -k gthread), in turns",
}
# What the service does about a kind of hostile traffic shows within seconds; `--short` (and
# tests/test_front_door.py) run each row for about a third of the time.
FULL = {"quiet": 10, "warmup": 1.0, "quiet_phase": 3, "flood": 6, "drip": 10, "pipeline": 10, "slow": 15,
        "slow_connections": 400, "slow_rate": 100, "burst_rounds": 3}
SHORT = {"quiet": 3, "warmup": 0.5, "quiet_phase": 2, "flood": 3, "drip": 4, "pipeline": 4, "slow": 5,
         "slow_connections": 200, "slow_rate": 100, "burst_rounds": 1}
# Never reading, with a small window (as slowhttptest -X sets one) and the classic 536-byte segments:
# Linux sizes a connection's send buffer in segments, so the server's fills within a second,
# where loopback's 64 KB segments would let it grow to megabytes first.
PIPELINE = ("pipeline", {"clients": 20, "rcvbuf": 4096, "mss": 536})
SLOW_MODES = {  # slowhttptest's own examples (its man page), at the rate and count
    "slowloris": ["-H", "-t", "GET", "-i", "10", "-x", "24", "-u", "{url}/v1/send"],
    "slowbody": ["-B", "-t", "POST", "-i", "10", "-x", "10", "-s", "8192", "-f", "application/json",
                 "-u", "{url}/v1/send"],
    "slowread": ["-X", "-k", "3", "-n", "5", "-z", "32", "-w", "512", "-y", "1024", "-u", "{url}/healthz"],
}


# -- measuring the legitimate sends ------------------------------------------------------

def summary(sends) -> dict:
    """p50/p99/max in ms and the failures (anything but a 200) of clients.legit()'s sends."""
    times = sorted(seconds for seconds, _ in sends)
    failed = [outcome for _, outcome in sends if outcome != 200]
    if not times:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None, "failed": 0, "failures": []}
    return {"n": len(times), "p50_ms": percentile(times, 50) * 1000, "p99_ms": percentile(times, 99) * 1000,
            "max_ms": times[-1] * 1000, "failed": len(failed), "failures": sorted(set(map(str, failed)))}


class Service:
    """A sink and herald-smtp (or stock gthread: `stock=True`) under gunicorn.conf.py, with the
    defaults; counts what the legitimate clients were answered and checks it reached the sink."""

    def __init__(self, workdir, env, stock=False):
        self.sink = Sink(workdir)
        if stock:
            env = {**env, "GUNICORN_CMD_ARGS": "--worker-class gthread"}  # overrides gunicorn.conf.py's
        try:
            self.server = Gunicorn("herald", self.sink.port, workdir, env)
        except BaseException:
            self.sink.stop()
            raise
        self.port, self.workers = self.server.port, int(env["WEB_CONCURRENCY"])
        self.ok = 0  # legitimate sends answered 200
        deadline = time.monotonic() + 20
        while len(self.pids()) < self.workers and time.monotonic() < deadline:
            time.sleep(0.05)  # healthy means one worker is up; every worker should be
        self.first_pids = self.pids()

    def pids(self) -> set:
        return set(worker_pids(self.server.proc.pid))

    def count(self, sends):
        self.ok += sum(outcome == 200 for _, outcome in sends)
        return sends

    def legit(self, seconds):
        return self.count(clients.run(self.port, seconds, key=API_KEY)[0])

    def stop(self) -> dict:
        """Stop both; what the workers and the sink did: worker restarts, stderr lines that are not
        JSON, mail answered 200 and mail the sink counted."""
        restarted = len(self.first_pids - self.pids())
        try:
            self.server.stop()
        finally:
            delivered = self.sink.messages()
            self.sink.stop()
        log = self.server.log.read_text().splitlines()
        not_json = sum(not line.startswith("{") for line in log)
        return {"worker_restarts": restarted, "stderr_not_json": not_json, "answered_200": self.ok,
                "delivered": delivered}


@contextlib.contextmanager
def service(workdir, env, scale, stock=False):
    """A Service, warmed up (each thread's SMTP session open), with the quiet phase measured."""
    svc = Service(workdir, env, stock)
    result = {}
    try:
        svc.legit(scale["warmup"])
        result["quiet"] = summary(svc.legit(scale["quiet_phase"]))
        yield svc, result
    except BaseException:
        with contextlib.suppress(Exception):
            svc.stop()
        raise
    result.update(svc.stop())


# -- the rows -------------------------------------------------------------------------------

def row_quiet(workdir, env, scale):
    with service(workdir, env, scale) as (svc, r):
        r["legit"] = summary(svc.legit(scale["quiet"]))
    return r, [target(r, "p50", r["legit"]["p50_ms"], None)]


def row_flood(workdir, env, scale):
    with service(workdir, env, scale) as (svc, r):
        seconds = scale["flood"]
        sends, (r["hostile"],) = clients.run(svc.port, seconds, [("flood", {"rate": 150, "hold": 0.5})], API_KEY)
        r["legit"] = summary(svc.count(sends))
    return r, latency_targets(r)


def row_drip(workdir, env, scale):
    with service(workdir, env, scale) as (svc, r):
        sends, (r["hostile"],) = clients.run(svc.port, scale["drip"], [("drip", {"clients": 30})], API_KEY)
        r["legit"] = summary(svc.count(sends))
    bound = 3 * r["quiet"]["p50_ms"] + 5
    return r, [target(r, "p50", r["legit"]["p50_ms"], bound, f"3x quiet p50 + 5 = {bound:.1f} ms"),
               failed_target(r)]


def row_pipeline(workdir, env, scale):
    with service(workdir, env, scale) as (svc, r):
        sends, (r["hostile"],) = clients.run(svc.port, scale["pipeline"], [PIPELINE], API_KEY)
        r["legit"] = summary(svc.count(sends))
    return r, [target(r, "max", r["legit"]["max_ms"], 1000), failed_target(r)]


def slowhttptest_args(mode, url, scale):
    return [SLOWHTTPTEST, *[a.format(url=url) for a in SLOW_MODES[mode]], "-c", str(scale["slow_connections"]),
            "-r", str(scale["slow_rate"]), "-l", str(scale["slow"]), "-p", "3"]


def row_slow(mode):
    def row(workdir, env, scale):
        with service(workdir, env, scale) as (svc, r):
            args = slowhttptest_args(mode, f"http://127.0.0.1:{svc.port}", scale)
            r["hostile"] = {"command": " ".join(args).replace(str(svc.port), "PORT")}
            with open(workdir / f"slowhttptest-{mode}.out", "w") as out:
                attack = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
                try:
                    # It ramps up at its rate, then holds its connections to the end of its -l; the
                    # legitimate client starts 0.8 s after it and stops before it does.
                    r["legit"] = summary(svc.count(clients.run(svc.port, scale["slow"] - 1.0, key=API_KEY)[0]))
                finally:
                    attack.wait(timeout=60)
            r["hostile"]["last_status"] = slowhttptest_status(workdir / f"slowhttptest-{mode}.out")
        return r, latency_targets(r)
    row.__name__ = f"row_{mode}"
    return row


def slowhttptest_status(path) -> str:
    """slowhttptest's last status report (its connections by state, whether its probe got an
    answer) and how it ended."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", path.read_text(errors="replace"))
    states = ("pending:", "connected:", "error:", "closed:", "service available:", "Exit status:")
    last = {}
    for line in text.splitlines():
        if line.strip().startswith(states):
            name, _, value = line.strip().partition(":")
            last[name] = " ".join(value.split())
    return ", ".join(f"{k} {v}" for k, v in last.items())


def huge_content_length(port, timeout=5.0) -> str:
    """A POST /v1/send whose Content-Length has 5000 digits: the status of the answer, "closed"
    (closed without one) or "timeout"."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"POST /v1/send HTTP/1.1\r\nHost: herald-smtp\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + b"9" * 5000 + b"\r\n\r\n{}")
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
                if b"\r\n" in data:
                    break
        except socket.timeout:
            return "timeout"
        except OSError:
            return "closed"
    return data.split()[1].decode() if data.startswith(b"HTTP/") else "closed"


def row_bigcl(workdir, env, scale):
    with service(workdir, env, scale) as (svc, r):
        legit = clients.start("legit", svc.port, time.monotonic() + 0.5, 4.0, key=API_KEY)
        time.sleep(1.5)  # the legitimate client is sending
        r["hostile"] = {"answers": [huge_content_length(svc.port) for _ in range(20)]}
        r["legit"] = summary(svc.count(clients.finish(legit)["sends"]))
        time.sleep(1)  # a worker that died is replaced by now
    answers = r["hostile"]["answers"]
    bad = [a for a in answers if a not in ("400", "closed")]
    return r, [(f"worker restarts: {r['worker_restarts']} (0)", r["worker_restarts"] == 0),
               (f"20 requests answered 400 or closed: {len(answers) - len(bad)} ({', '.join(sorted(set(answers)))})",
                not bad),
               failed_target(r)]


def burst(port, key=API_KEY, n=200):
    """clients.burst() in a process of its own: its sends."""
    return clients.finish(clients.start("burst", port, time.monotonic() + 0.5, 0, n=n, key=key))["sends"]


def row_burst(workdir, env, scale):
    """herald-smtp and stock gthread, both running; bursts in turns, herald-smtp first."""
    ours = Service(workdir, env)
    try:
        stock = Service(workdir, env, stock=True)
    except BaseException:
        ours.stop()
        raise
    r = {"herald": [], "gthread": []}
    try:
        for svc in (ours, stock):
            svc.legit(scale["warmup"])
        for _ in range(scale["burst_rounds"]):
            for name, svc in (("herald", ours), ("gthread", stock)):
                r[name].append(summary(svc.count(burst(svc.port))))
                time.sleep(0.5)
    finally:
        r["herald_service"], r["gthread_service"] = ours.stop(), stock.stop()
    slowest = {name: statistics.median(s["max_ms"] for s in r[name]) for name in ("herald", "gthread")}
    r["slowest_ms"] = slowest
    failed = sum(s["failed"] for name in ("herald", "gthread") for s in r[name])
    delivered = all(r[k]["delivered"] >= r[k]["answered_200"] for k in ("herald_service", "gthread_service"))
    return r, [(f"slowest answer {slowest['herald']:.0f} ms <= 2x stock gthread's {slowest['gthread']:.0f} ms",
                slowest["herald"] <= 2 * slowest["gthread"]),
               (f"burst sends failed: {failed} (0)", failed == 0),
               (f"every 200 delivered: " + ", ".join(
                   f"{k[:-8]} {r[k]['answered_200']} answered, {r[k]['delivered']} at the sink"
                   for k in ("herald_service", "gthread_service")), delivered)]


ROW_FUNCTIONS = {"quiet": row_quiet, "flood": row_flood, "drip": row_drip, "pipeline": row_pipeline,
                 **{mode: row_slow(mode) for mode in SLOW_MODES}, "bigcl": row_bigcl, "burst": row_burst}


# -- targets ---------------------------------------------------------------------------------

def target(r, what, measured, bound, bound_text=None):
    """(text, ok): `what` measured against `bound` ms (None: reported, no target)."""
    if bound is None:
        return f"{what} {measured:.1f} ms (no target)", True
    return f"{what} {measured:.1f} ms <= {bound_text or f'{bound:g} ms'}", measured <= bound


def failed_target(r):
    return f"failed {r['legit']['failed']} of {r['legit']['n']} (0)", r["legit"]["failed"] == 0


def latency_targets(r):
    """The issue's bounds for a flood or a slow attack: p99 <= 100 ms, max <= 500 ms, none failed."""
    return [target(r, "p99", r["legit"]["p99_ms"], 100), target(r, "max", r["legit"]["max_ms"], 500),
            failed_target(r)]


def delivery_target(r):
    return (f"every 200 delivered: {r['answered_200']} answered, {r['delivered']} at the sink",
            r["delivered"] >= r["answered_200"])


# -- the run -----------------------------------------------------------------------------------

def describe(name, r) -> str:
    """One line of what the legitimate client saw, and what the service did."""
    if name == "burst":
        return "; ".join(f"{k}: slowest " + ", ".join(f"{s['max_ms']:.0f}" for s in r[k]) + " ms, p50 "
                         + ", ".join(f"{s['p50_ms']:.0f}" for s in r[k]) + " ms" for k in ("herald", "gthread"))
    q, leg = r["quiet"], r["legit"]
    text = (f"quiet p50 {q['p50_ms']:.1f} ms; legit n={leg['n']} p50 {leg['p50_ms']:.1f} p99 {leg['p99_ms']:.1f} "
            f"max {leg['max_ms']:.1f} ms, failed {leg['failed']}{' ' + str(leg['failures']) if leg['failed'] else ''}; "
            f"worker restarts {r['worker_restarts']}; stderr lines not JSON {r['stderr_not_json']}")
    if "hostile" in r:
        text += f"; hostile: {json.dumps({k: v for k, v in r['hostile'].items() if k != 'answers'})}"
    return text


def ensure_tools():
    missing = [pkg for pkg, ok in (("postfix", os.path.exists(SMTP_SINK)),
                                   ("slowhttptest", shutil.which(SLOWHTTPTEST))) if not ok]
    if missing:
        sys.exit(f"bench/hostile.py needs Postfix's smtp-sink and slowhttptest. Install them with:\n"
                 f"  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "
                 f"{' '.join(missing)}")


def render(results, header) -> str:
    lines = [header, "", "| row | quiet p50 ms | legit n | p50 ms | p99 ms | max ms | failed | worker restarts | "
             "targets |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, (r, checks) in results.items():
        verdicts = "; ".join(f"{'PASS' if ok else 'FAIL'} {text}" for text, ok in checks)
        if name == "burst":
            lines.append(f"| {name} | - | - | - | - | - | - | - | {verdicts} |")
            continue
        q, leg = r["quiet"], r["legit"]
        lines.append(f"| {name} | {q['p50_ms']:.1f} | {leg['n']} | {leg['p50_ms']:.1f} | {leg['p99_ms']:.1f} | "
                     f"{leg['max_ms']:.1f} | {leg['failed']} | {r['worker_restarts']} | {verdicts} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="rows:\n" + "\n".join(f"  {k:10} {v}" for k, v in ROWS.items()))
    parser.add_argument("--row", action="append", choices=list(ROWS), help="run only this row (repeatable)")
    parser.add_argument("--short", action="store_true", help="each row about a third as long")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="where hostile.md and .json go")
    args = parser.parse_args()
    ensure_tools()
    scale = SHORT if args.short else FULL
    cfg = load_config({})
    env = bench_env(cfg.web_concurrency, cfg.web_threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="hostile-", suffix=".tmp", dir=out))  # logs; kept if a row fails
    header = (f"herald-smtp against callers without the key, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, "
              f"commit {commit()}, {os.cpu_count()} CPUs, gunicorn {cfg.web_concurrency} workers x "
              f"{cfg.web_threads} threads\nCommand: bench/hostile.py {' '.join(sys.argv[1:])}".rstrip())
    print(header, flush=True)
    results = {}
    for name in args.row or ROWS:
        print(f"\n{name}: {ROWS[name]}", flush=True)
        r, checks = ROW_FUNCTIONS[name](workdir, env, scale)
        if name != "burst":
            checks.append(delivery_target(r))
        results[name] = (r, checks)
        print("  " + describe(name, r), flush=True)
        for text, ok in checks:
            print(f"  {'PASS' if ok else 'FAIL'}: {text}", flush=True)
    shutil.rmtree(workdir)
    table = render(results, header)
    print("\n" + table)
    (out / "hostile.md").write_text(table)
    (out / "hostile.json").write_text(json.dumps(
        {name: {"figures": r, "checks": [{"target": t, "pass": ok} for t, ok in checks]}
         for name, (r, checks) in results.items()}, indent=2) + "\n")
    print(f"written: {out / 'hostile.md'}, {out / 'hostile.json'}")
    sys.exit(0 if all(ok for _, checks in results.values() for _, ok in checks) else 1)


if __name__ == "__main__":
    main()
