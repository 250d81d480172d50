"""What the idempotency store costs per request: `.venv/bin/python bench/idempotency_bench.py`.

In one run, herald-smtp under its own gunicorn.conf.py (same workers and threads each time),
sending to Postfix's smtp-sink, loaded by wrk at the connection count of bench/run.py:
  - no Idempotency-Key (the store is not touched),
  - a unique key per request on the default SQLite store (a fresh file per run, in the default
    store's directory, so on the same filesystem),
  - a unique key per request on Redis (a database of its own, flushed before each run),
  - the same on a Redis master with a replica the benchmark starts (redis-server on free
    loopback ports), with IDEMPOTENCY_WAIT_REPLICAS=1: each write waits for the replica (WAIT),
in interleaved rounds, median of each, with the default IDEMPOTENCY_MAX_ENTRIES.
With --floor, also herald-smtp on the bare writes of its SQLite layout (bench/apps.py:floor): the
INSERT and UPDATE of a new key, then the INSERT alone, then no write at all (what a key costs
outside the store: fingerprint and checks); what the store costs before its own logic.
Prints req/s, p50, p99, the per-request cost (1 / req/s at saturation) and its overhead over no key,
and the gunicorn workers' CPU time per request (Redis's own CPU not included), which the noise
of a shared machine moves less than req/s. wrk's keep-alive connections stay with the worker that
accepted them, and when most land on one worker, req/s is that worker's alone; the split (the
least busy worker's CPU over the busiest's) is printed for every round, and the CPU figure holds
either way. For the steadiest figures, run one worker: WEB_CONCURRENCY=1 with --connections 8.
Target: the default store adds under 10% to the request cost.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.run import (Sink, free_port, fresh_sqlite, prepare, remove_sqlite, stop, wait_for,  # noqa: E402
                       worker_pids, workers_cpu)

API_KEY = "bench-api-key"  # bench_env's
VARIANTS = {"none": "no key", "sqlite": "SQLite store (default)", "redis": "Redis store",
            "redis_wait": "Redis store, WAIT for its replica",
            "floor2": "floor: SQLite INSERT + UPDATE only", "floor1": "floor: SQLite INSERT only",
            "floor0": "floor: a key, no store writes", "redis_floor": "floor: two Redis round trips (PING)"}
# The others serve app:app.
APPS = {"floor2": "bench.apps:floor(2)", "floor1": "bench.apps:floor(1)", "floor0": "bench.apps:floor(0)",
        "redis_floor": "bench.apps:redis_floor()"}


def wrk(url, seconds, connections, keyed, cpu=None, traced=False):
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s", "-s", str(ROOT / "bench" / "send.lua"),
           url + "/v1/send", "--", uuid.uuid4().hex[:12], API_KEY, "key" if keyed else "nokey",
           "trace" if traced else "notrace"]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    r = json.loads(next(line[6:] for line in out.splitlines() if line.startswith("BENCH ")))
    return {"rps": r["requests"] / (r["duration_us"] / 1e6), "p50_ms": r["p50_us"] / 1000,
            "p99_ms": r["p99_us"] / 1000, "socket_errors": r["socket_errors"]}


CPUS = sorted(os.sched_getaffinity(0))


def pin(master, sink):
    """Each worker, every thread of it, on a CPU of its own: without the GIL handing off between
    CPUs, a worker's CPU per request moves far less with the machine's load. wrk goes on the last
    CPU (left to wander, it made some runs half as fast) and the sink on the first, so every run
    shares the CPUs out alike."""
    for i, pid in enumerate(worker_pids(master)):
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(tid), {CPUS[i % len(CPUS)]})
    os.sched_setaffinity(sink.proc.pid, {CPUS[0]})


def load(app, env, log, args, sink, keyed, traced=False, cwd=ROOT):
    """gunicorn serving `app` (env["PORT"] = 127.0.0.1:port), warmed up, then one measured wrk run:
    its result with the workers' CPU per request and how evenly they shared it. Stops gunicorn."""
    url = "http://" + env["PORT"]
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", app],
                                cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: proc.poll() is None and urllib.request.urlopen(url + "/healthz", timeout=1),
                 f"gunicorn (see {log})")
        if args.pin:
            pin(proc.pid, sink)
        wrk_cpu = CPUS[-1] if args.pin else None
        wrk(url, args.warmup, args.connections, keyed, wrk_cpu, traced)
        cpu = workers_cpu(proc.pid)
        result = wrk(url, args.duration, args.connections, keyed, wrk_cpu, traced)
        used = [t - cpu.get(pid, 0) for pid, t in workers_cpu(proc.pid).items()]
        result["cpu_ms"] = sum(used) * 1000 / (result["rps"] * args.duration)
        result["split"] = min(used) / max(used) if max(used) > 0 else 1.0
    finally:
        stop(proc)
    return result


class ReplicatedRedis:
    """A master and its replica on free loopback ports, in `workdir`; stop() ends both."""

    def __init__(self, workdir):
        self.master, replica = free_port(), free_port()
        self.procs = []
        for port, extra in ((self.master, []), (replica, ["--replicaof", "127.0.0.1", str(self.master)])):
            node = workdir / f"redis-{port}"
            node.mkdir()
            self.procs.append(subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                                "--appendonly", "no", "--dir", str(node), *extra],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for(lambda: self._linked(replica), "the replica's link to its master")
        self.url = f"redis://127.0.0.1:{self.master}/0"

    @staticmethod
    def _linked(port):
        try:
            return redis.Redis(port=port).info("replication").get("master_link_status") == "up"
        except redis.ConnectionError:
            return False  # still starting

    def stop(self):
        for proc in self.procs:
            proc.terminate()
            proc.wait(10)


def one_run(variant, args, workdir, env):
    """Fresh sink, store and gunicorn; warm-up, then the measured wrk run."""
    sqlite = fresh_sqlite("bench")
    store = {"redis": args.redis_url, "redis_floor": args.redis_url,
             "redis_wait": args.replicated.url}.get(variant, f"sqlite://{sqlite}")
    if variant.startswith("redis"):
        redis.Redis.from_url(store).flushdb()
    sink = Sink(workdir)
    port = free_port()
    log = workdir / f"gunicorn-{variant}-{port}.log"
    genv = {**env, "PORT": f"127.0.0.1:{port}", "SMTP_PORT": str(sink.port),
            "IDEMPOTENCY_STORE": store, "IDEMPOTENCY_WAIT_REPLICAS": "1" if variant == "redis_wait" else "0"}
    try:
        result = load(APPS.get(variant, "app:app"), genv, log, args, sink, keyed=variant != "none")
        result["delivered"] = sink.messages()
    finally:
        sink.stop()
        remove_sqlite(sqlite)
    answered = [json.loads(line)["status"] for line in log.read_text().splitlines()
                if '"event": "access"' in line and '"/v1/send"' in line]
    result["ok"] = sum(str(s) == "200" for s in answered)
    result["errors"] = len(answered) - result["ok"] + result.pop("socket_errors")  # warm-up included
    return result


def render(results, args, workers, threads):
    lines = [f"wrk -t1 -c{args.connections}, {args.duration} s per run after {args.warmup} s warm-up, median of "
             f"{args.rounds} rounds, each running every variant back to back (order rotating); overheads are the median "
             "of each round's own ratio, so a load that drifts over minutes cancels out. "
             f"gunicorn gthread {workers} workers x {threads} threads{', each pinned to a CPU (wrk and smtp-sink too)' if args.pin else ''}; smtp-sink; "
             "a unique Idempotency-Key per request.", "",
             "| variant | req/s | p50 ms | p99 ms | cost ms/req | overhead vs no key | worker CPU ms/req | CPU overhead "
             "| errors | 200s | sink counted |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v, r in results.items():
        overhead = "-" if v == "none" else f"{r['overhead'] * 100:+.1f}%"
        cpu_overhead = "-" if v == "none" else f"{r['cpu_overhead'] * 100:+.1f}%"
        lines.append(f"| {VARIANTS[v]} | {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['cost_ms']:.3f} | "
                     f"{overhead} | {r['cpu_ms']:.3f} | {cpu_overhead} | {r['errors']} | {r['ok']} | {r['delivered']} |")
    if "sqlite" not in results:
        return "\n".join(lines)
    sq, sq_cpu = results["sqlite"]["overhead"] * 100, results["sqlite"]["cpu_overhead"] * 100
    lines += ["", f"Target: the default store adds under 10% to the request cost: "
              f"{'PASS' if sq < 10 else 'FAIL'} by req/s ({sq:+.1f}%), {'PASS' if sq_cpu < 10 else 'FAIL'} "
              f"by worker CPU per request ({sq_cpu:+.1f}%)."]
    return "\n".join(lines)


def load_options(parser, duration):
    """The options load() reads, for a benchmark's own parser."""
    parser.add_argument("--duration", type=int, default=duration, help=f"seconds per measured wrk run ({duration})")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of wrk before each measured run (2)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the variants (5)")
    parser.add_argument("--connections", type=int, default=0, help="wrk connections (workers x threads)")
    parser.add_argument("--pin", action="store_true",
                        help="pin each gunicorn worker, wrk and the sink to CPUs: steadier figures on a noisy machine")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    load_options(parser, duration=8)
    parser.add_argument("--floor", action="store_true",
                        help="also run herald-smtp on the bare writes of its SQLite layout (bench/apps.py:floor)")
    parser.add_argument("--variants", default="",
                        help="comma-separated variants to run, from: " + ", ".join(VARIANTS) + " (no key is always run)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14",
                        help="a Redis database of the benchmark's own: it is flushed (redis://127.0.0.1:6379/14)")
    args = parser.parse_args()

    workers, threads, env = prepare(args)
    names = [v for v in VARIANTS if args.floor or not v.startswith(("floor", "redis_floor"))]
    if args.variants:
        names = ["none", *[v for v in args.variants.split(",") if v in VARIANTS and v != "none"]]
    rounds = {v: [] for v in names}
    with tempfile.TemporaryDirectory(prefix="herald-idem-bench-") as tmp:
        workdir = Path(tmp)
        args.replicated = ReplicatedRedis(workdir)
        try:
            for i in range(args.rounds):
                for v in names[i % len(names):] + names[:i % len(names)]:
                    print(f"round {i + 1}/{args.rounds}: {VARIANTS[v]}", flush=True)
                    rounds[v].append(one_run(v, args, workdir, env))
        finally:
            args.replicated.stop()
    redis.Redis.from_url(args.redis_url).flushdb()
    results = {}
    for v, rs in rounds.items():
        r = {k: statistics.median(x[k] for x in rs) for k in ("rps", "p50_ms", "p99_ms", "cpu_ms")}
        r.update({k: sum(x[k] for x in rs) for k in ("errors", "ok", "delivered")})
        r["cost_ms"] = 1000 / r["rps"]
        r["rounds"] = [f"{x['rps']:.0f} ({x['split']:.2f})" for x in rs]
        # Cost is 1 / req/s at saturation: the overhead is how much longer a request takes.
        r["overhead"] = statistics.median(n["rps"] / x["rps"] - 1 for n, x in zip(rounds["none"], rs))
        r["cpu_overhead"] = statistics.median(x["cpu_ms"] / n["cpu_ms"] - 1 for n, x in zip(rounds["none"], rs))
        results[v] = r
    print()
    print(f"herald-smtp idempotency store cost, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, "
          f"commit {subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True).stdout.strip()}")
    print(f"Command: .venv/bin/python bench/idempotency_bench.py {' '.join(sys.argv[1:])}".rstrip())
    print()
    print(render(results, args, workers, threads))
    print("req/s per round (worker CPU split): " + "; ".join(f"{VARIANTS[v]} {', '.join(r['rounds'])}"
                                                          for v, r in results.items()))


if __name__ == "__main__":
    main()
