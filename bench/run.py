"""herald-smtp benchmark, side by side in one run: `make bench` (options: `bench/run.py --help`).

Throughput: wrk (bench/send.lua, a unique Idempotency-Key per request) against
  - herald-smtp under its own gunicorn.conf.py, with the default settings,
  - the connection-per-send baseline (bench/apps.py:baseline, same gunicorn.conf.py),
  - the Flask-Mail app a user would write instead (bench/apps.py:flaskmail, same gunicorn.conf.py),
    these three in interleaved rounds, herald-smtp's req/s over Flask-Mail's given per round,
  - a bare Flask JSON endpoint (bench/apps.py:bare): the HTTP ceiling,
each sending to Postfix's smtp-sink, whose message count is checked against the 200s the
server logged; and smtplib straight to the sink on open connections: the SMTP ceiling. Every
gunicorn run also gives each worker's share of the workers' CPU.
Latency: sequential requests through an SMTP server that delays every reply and offers
PIPELINING and CHUNKING (bench/delay_smtp.py), for herald-smtp and both baselines, and for
herald-smtp once more through one without CHUNKING, also in round trips.
Prints the tables and writes them to bench/results/latest.md and latest.json.
"""

import argparse
import concurrent.futures
import contextlib
import http.client
import json
import multiprocessing
import os
import re
import shutil
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT))
from herald_smtp.config import default_idempotency_store, load_config  # noqa: E402
from herald_smtp.store.opener import sqlite_path  # noqa: E402
from herald_smtp.smtp.message import MessageBuilder, SendRequest  # noqa: E402

SMTP_SINK = "/usr/sbin/smtp-sink"
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
API_KEY = "bench-api-key"
SENDER = "noreply@example.com"
TARGETS = {"herald": "app:app", "baseline": "bench.apps:baseline", "flaskmail": "bench.apps:flaskmail",
           "bare": "bench.apps:bare"}
# The apps a Flask user would run instead are served as such a user serves them: gunicorn's stock
# gthread worker (same workers and threads, same gunicorn.conf.py otherwise).
STOCK_GTHREAD = ("baseline", "flaskmail")
# Measured in rounds, back to back, the order alternating, so that each round's ratio compares two
# neighbouring runs; the connection-per-send app by hand and the ceilings run once.
ROUNDS = ("herald", "flaskmail")
APPS = ("herald", "baseline", "flaskmail")
LABELS = {"herald": "herald-smtp", "herald-data": "herald-smtp, server without CHUNKING", "baseline": "baseline: connection per send", "flaskmail": "baseline: Flask-Mail",
          "bare": "HTTP ceiling: bare Flask JSON", "smtp": "SMTP ceiling: smtplib, open connections"}


def ensure_tools():
    # sasl2-bin: saslpasswd2, for the private Postfix's AUTH users (the relay table).
    missing = [pkg for pkg, ok in (("wrk", shutil.which("wrk")), ("postfix", os.path.exists(SMTP_SINK)),
                                   ("sasl2-bin", shutil.which("saslpasswd2", path=SBIN_PATH))) if not ok]
    if not missing:
        return
    install = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        sys.exit(f"bench needs wrk, Postfix and sasl2-bin. Install them with:\n"
                 f"  sudo DEBIAN_FRONTEND=noninteractive {' '.join(install)} && sudo postfix stop\n"
                 f"(the benchmark needs no mail daemon on port 25: it runs Postfix's smtp-sink, and a private "
                 f"Postfix of its own as root)")
    print(f"installing {' '.join(missing)} with apt-get", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=True)
    subprocess.run(install, env=env, check=True, stdout=subprocess.DEVNULL)
    if "postfix" in missing:
        # Where systemd runs, the package starts a mail daemon on port 25; nothing here wants it.
        for cmd in (["postfix", "stop"], ["systemctl", "disable", "--now", "postfix"]):
            if shutil.which(cmd[0]):
                subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if check():
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not come up")


def cpu_seconds(*pids, reaped=False) -> float:
    """User plus system CPU time of these processes (Linux /proc), to cost each request. With
    `reaped`, also that of the children each has waited for: summed over every live process of a
    tree, it counts the CPU of processes that came and went (Postfix's smtpd, cleanup) once."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15 if reaped else 13])
    return total / os.sysconf("SC_CLK_TCK")


def worker_pids(master: int) -> list:
    """A gunicorn master's children: its workers."""
    return [pid for task in Path(f"/proc/{master}/task").iterdir() for pid in (task / "children").read_text().split()]


def workers_cpu(master: int) -> dict:
    """CPU seconds (user + system) used so far by each of the master's workers, by pid."""
    return {pid: cpu_seconds(pid) for pid in worker_pids(master)}


def worker_shares(before: dict, after: dict) -> list:
    """Each worker's share of the CPU the workers used between two workers_cpu(), busiest first."""
    used = [after[pid] - before.get(pid, 0.0) for pid in after]
    total = sum(used)
    return sorted((u / total if total else 0.0 for u in used), reverse=True)


def uneven(shares: list) -> bool:
    """The busiest worker did more than twice the mean of the others: what a keep-alive
    connection pile-up looks like (with 2 workers, over 2/3 of the CPU)."""
    return len(shares) > 1 and shares[0] > 2 * (1 - shares[0]) / (len(shares) - 1)


def worker_connections(master: int, port: int) -> list:
    """How many established connections to 127.0.0.1:port each of the master's workers holds,
    most first (/proc/net/tcp's socket inodes, found among each worker's open files)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":  # 01: ESTABLISHED
            inodes.add(f"socket:[{fields[9]}]")
    counts = []
    for pid in worker_pids(master):
        held = 0
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    held += os.readlink(fd) in inodes
        counts.append(held)
    return sorted(counts, reverse=True)


def piled_up(connections: list) -> bool:
    """Stock gthread's keep-alive pile-up: a worker holds under a third of its fair share of the
    connections (16 / 0, 15 / 1 or 14 / 2 with 2 workers), every connection on one worker at
    worst. wrk opens all its connections at once and whichever worker wakes first accepts most of
    them; such a run measures the split, not the app (on loopback a worker with 2 connections
    leaves its CPU idle a quarter of the time), so it is started again. Milder splits are kept
    (and shown): they are what stock gthread gives its users."""
    if len(connections) < 2:
        return False
    return connections[-1] < sum(connections) / len(connections) / 3


def shares_text(shares: list) -> str:
    return " / ".join(f"{s:.2f}" for s in shares) + (" UNEVEN" if uneven(shares) else "")


def fresh_sqlite(prefix):
    """A new SQLite file's path where the default store lives (its directory, so its filesystem)."""
    return os.path.join(os.path.dirname(sqlite_path(default_idempotency_store({}))),
                        f"{prefix}-{uuid.uuid4().hex[:8]}.sqlite3")


def remove_sqlite(path):
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)


def started(proc, check, what):
    """Wait until `check()` holds; a process that never gets there is stopped, not left behind."""
    try:
        wait_for(check, what)
    except BaseException:
        stop(proc)
        raise


def stop(proc, timeout=40):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Sink:
    """smtp-sink on loopback; -c prints running counters ("... mesg=N") we read at the end."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.out = workdir / f"smtp-sink-{self.port}.out"
        user = ["-u", "nobody"] if os.geteuid() == 0 else []  # it refuses to run as root
        with open(self.out, "w") as out:
            self.proc = subprocess.Popen([SMTP_SINK, "-c", *user, f"127.0.0.1:{self.port}", "1024"],
                                         stdout=out, stderr=subprocess.STDOUT)
        started(self.proc, lambda: socket.create_connection(("127.0.0.1", self.port), 1).close() or True,
                "smtp-sink")

    def messages(self) -> int:
        time.sleep(0.5)  # the counters update when a session ends
        counts = re.findall(r"mesg=(\d+)", self.out.read_text())
        return int(counts[-1]) if counts else 0

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self):
        stop(self.proc)


class Gunicorn:
    """One of TARGETS under the project's gunicorn.conf.py, sending to 127.0.0.1:smtp_port."""

    def __init__(self, target: str, smtp_port: int, workdir: Path, env: dict):
        self.target = target
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"{target}-{self.port}.log"
        # A new file each run, on the filesystem the default store uses (tmpfs here), as deployed.
        self.store = fresh_sqlite(f"bench-{target}")
        env = {**env, "PORT": f"127.0.0.1:{self.port}", "SMTP_PORT": str(smtp_port),
               "IDEMPOTENCY_STORE": f"sqlite://{self.store}"}
        if target in STOCK_GTHREAD:
            env["GUNICORN_CMD_ARGS"] = "--worker-class gthread"  # overrides gunicorn.conf.py's
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", TARGETS[target]],
                                         cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            started(self.proc,
                    lambda: self.proc.poll() is None and urllib.request.urlopen(self.url + "/healthz", timeout=1),
                    f"{target} (see {self.log})")
            # Every worker too, not only the first: one still loading the app takes no connection.
            workers = int(env.get("WEB_CONCURRENCY") or 1)
            started(self.proc, lambda: self.log.read_text().count('"Worker ready (pid: ') >= workers,
                    f"{target}'s workers (see {self.log})")
        except BaseException:
            remove_sqlite(self.store)
            raise

    def answered(self):
        """(200s, other statuses) for POST /v1/send, from the JSON access log: what clients were told."""
        ok = other = 0
        for line in self.log.read_text().splitlines():
            if '"event": "access"' in line and '"/v1/send"' in line:
                entry = json.loads(line)
                if str(entry["status"]) == "200":
                    ok += 1
                else:
                    other += 1
        return ok, other

    def cpu(self) -> float:
        """The master's and the workers' CPU seconds so far."""
        return cpu_seconds(self.proc.pid, *worker_pids(self.proc.pid))

    def connections(self) -> list:
        """Established client connections per worker, most first."""
        return worker_connections(self.proc.pid, self.port)

    def stop(self):
        stop(self.proc)  # SIGTERM: in-flight requests finish, workers QUIT their SMTP sessions
        remove_sqlite(self.store)


def prepare(args):
    """Tools installed, and the worker and thread counts gunicorn.conf.py will read, for every
    target: returns (workers, threads, environment); wrk's connections default to workers x threads."""
    ensure_tools()
    cfg = load_config({k: v for k, v in os.environ.items() if k in ("WEB_CONCURRENCY", "WEB_THREADS")})
    workers, threads = cfg.web_concurrency, cfg.web_threads
    args.connections = args.connections or workers * threads
    return workers, threads, bench_env(workers, threads)


def bench_env(workers: int, threads: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SMTP_", "API_KEY", "IDEMPOTENCY_", "PROMETHEUS_", "WEB_", "OTLP_", "OTEL_"))}
    # Set, even when empty, so a developer's .env cannot change the run (the environment wins).
    env.update(SMTP_HOST="127.0.0.1", SMTP_FROM=SENDER, SMTP_USE_STARTTLS="false", SMTP_USE_TLS="false",
               SMTP_USER="", SMTP_PASSWORD="", API_KEY=API_KEY, LOG_LEVEL="info",
               WEB_CONCURRENCY=str(workers), WEB_THREADS=str(threads), OTLP_ENABLED="false", OTLP_ENDPOINT="")
    return env


def wrk(url: str, seconds: float, connections: int, server=None, snapshot=dict, restarts=0) -> dict:
    """One wrk run. With `server` (a Gunicorn), also how its workers hold the connections, read as
    soon as all are accepted (keep-alive: each stays with the worker that accepted it for the whole
    run); a stock gthread server that piled them up (piled_up) has the run started again at once,
    up to `restarts` times, after a second of wrk on connections of its own, as after the warm-up
    (started after a pause instead, the same idle worker wins almost every accept): "restarted"
    lists the splits left behind. `snapshot()` is called just
    before the run that counts starts: its value is returned as "before"."""
    def command(seconds):  # each run its own keys
        return ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "30s", "-s",
                str(BENCH / "send.lua"), url + "/v1/send", "--", uuid.uuid4().hex[:12], API_KEY]
    held, restarted = None, []
    while True:
        before = snapshot()
        proc = subprocess.Popen(command(seconds), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if server is None:
            break
        deadline = time.monotonic() + 2.0
        while True:
            time.sleep(0.1)
            held = server.connections()
            if sum(held) >= connections or time.monotonic() > deadline:
                break
        if server.target not in STOCK_GTHREAD or len(restarted) >= restarts or not piled_up(held):
            break
        proc.kill()
        proc.communicate()
        restarted.append(held)
        subprocess.run(command(1), capture_output=True, check=True)
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err.strip()}")
    r = json.loads(next(line[6:] for line in out.splitlines() if line.startswith("BENCH ")))
    return {"requests": r["requests"], "rps": r["requests"] / (r["duration_us"] / 1e6), "p50_ms": r["p50_us"] / 1000,
            "p99_ms": r["p99_us"] / 1000, "wrk_errors": r["non_2xx"] + r["socket_errors"], "connections": held,
            "restarted": restarted, "before": before}


def throughput(target: str, args, workdir: Path, env: dict) -> dict:
    sink = Sink(workdir)
    try:
        server = Gunicorn(target, sink.port, workdir, env)
        try:
            wrk(server.url, args.warmup, args.connections)
            result = wrk(server.url, args.duration, args.connections, server, restarts=args.restarts,
                         snapshot=lambda: ((server.cpu(), sink.cpu()), workers_cpu(server.proc.pid)))
            cpu, workers = result.pop("before")
            result["worker_shares"] = worker_shares(workers, workers_cpu(server.proc.pid))
            # CPU per request holds up on a busy machine better than requests/s does.
            result["server_cpu_us"] = (server.cpu() - cpu[0]) / result["requests"] * 1e6
            result["sink_cpu_us"] = (sink.cpu() - cpu[1]) / result["requests"] * 1e6
        finally:
            server.stop()
        result["ok"], result["non_2xx"] = server.answered()
        result["delivered"] = sink.messages() if target != "bare" else None
    finally:
        sink.stop()
    return result


def balance(args, workdir: Path, env: dict) -> dict:
    """How herald-smtp's workers share the work: one gunicorn, wrk runs of args.balance_seconds at
    4, 8 and 16 keep-alive connections, args.balance_runs of each; each run's workers' CPU shares.
    A connection stays with the worker that accepted it, so each run tests the split anew."""
    sink = Sink(workdir)
    try:
        server = Gunicorn("herald", sink.port, workdir, env)
        try:
            wrk(server.url, args.warmup, 4)
            runs = {}
            for connections in (4, 8, 16):
                runs[connections] = []
                for i in range(args.balance_runs):
                    before = workers_cpu(server.proc.pid)
                    result = wrk(server.url, args.balance_seconds, connections)
                    shares = worker_shares(before, workers_cpu(server.proc.pid))
                    runs[connections].append({"rps": result["rps"], "shares": shares})
                    print(f"balance: {connections} connections, run {i + 1}/{args.balance_runs}: {result['rps']:.0f} "
                          f"req/s; workers' CPU shares: {shares_text(shares)}", flush=True)
        finally:
            server.stop()
    finally:
        sink.stop()
    return runs


def measure(target: str, when: str, args, workdir: Path, env: dict, run=None) -> dict:
    """throughput() (or `run`), saying what runs and what it gave: the workers' CPU shares, the
    connections each held, and the starts measured again because stock gthread piled them up."""
    run = run or throughput
    print(f"{run.__name__}{' ' + when if when else ''}: {LABELS[target]}", flush=True)
    result = run(target, args, workdir, env)
    for held in result["restarted"]:
        print(f"  stock gthread piled the connections up ({' / '.join(map(str, held))}): started again", flush=True)
    print(f"  {result['rps']:.0f} req/s; workers' CPU shares: {shares_text(result['worker_shares'])}; "
          f"connections per worker: {' / '.join(map(str, result['connections'] or [])) or '?'}", flush=True)
    return result


class Relay:
    """A private Postfix (tests/postfix_server.py: STARTTLS with a certificate from a private
    trustme CA, Cyrus SASL AUTH only after STARTTLS, delivery to a Maildir of its own) behind
    bench/delay_smtp.py's proxy, which delivers every byte Postfix writes `delay_ms` late: the
    mail relay as users have it, across a network. One for every app, measured in turns."""

    def __init__(self, workdir: Path, delay_ms: float):
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import SMTP_PASSWORD, SMTP_USER, Certs
        from postfix_server import DOMAIN, PostfixServer

        self.certs = Certs(workdir)
        self.postfix = PostfixServer(workdir, certs=self.certs, auth=True).start()
        self.port = free_port()
        self.proxy = subprocess.Popen([sys.executable, str(BENCH / "delay_smtp.py"), str(self.port), str(delay_ms),
                                       "proxy", str(self.postfix.port)], stdout=subprocess.PIPE, text=True)
        self.proxy.stdout.readline()  # "ready"
        # 127.0.0.1 is in the certificate: both apps verify it against the private CA.
        self.env = {"SMTP_HOST": "127.0.0.1", "SMTP_USE_STARTTLS": "true", "SMTP_CA_FILE": self.certs.ca_file,
                    "SMTP_USER": SMTP_USER, "SMTP_PASSWORD": SMTP_PASSWORD, "SMTP_FROM": f"noreply@{DOMAIN}"}
        self.new = Path(self.postfix.maildir) / "new"

    def delivered(self, timeout=120.0) -> int:
        """Mail in the Maildir once Postfix's queue is empty (a 250 means it is queued)."""
        deadline = time.monotonic() + timeout
        while self.postfix._queued():
            if time.monotonic() > deadline:
                raise RuntimeError(f"Postfix's queue not empty after {timeout:g} s (its log: {self.postfix.maillog})")
            time.sleep(0.05)
        with contextlib.suppress(FileNotFoundError):
            return sum(1 for _ in os.scandir(self.new))
        return 0

    def clear(self):
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.new):
                os.unlink(entry.path)

    def cpu(self) -> float:
        """CPU seconds of every Postfix process so far, those already gone included."""
        return cpu_seconds(*self.postfix.pids(), reaped=True)

    def relay(self, target: str, args, workdir: Path, env: dict) -> dict:
        """A warm-up, then wrk at args.relay_connections: latency and throughput, the app's CPU
        (gunicorn master and workers) per request, Postfix's per mail delivered in the run
        (the warm-up's mail delivered before, the run's after), every 200 checked delivered."""
        self.clear()
        server = Gunicorn(target, self.port, workdir, {**env, **self.env})
        try:
            wrk(server.url, args.warmup, args.relay_connections)
            time.sleep(0.3)  # the warm-up's last requests finish their sends
            mail, postfix_cpu = self.delivered(), self.cpu()
            result = wrk(server.url, args.relay_duration, args.relay_connections, server, restarts=args.restarts,
                         snapshot=lambda: (server.cpu(), workers_cpu(server.proc.pid)))
            cpu, workers = result.pop("before")
            result["server_cpu_us"] = (server.cpu() - cpu) / result["requests"] * 1e6
            result["worker_shares"] = worker_shares(workers, workers_cpu(server.proc.pid))
            time.sleep(0.3)
            mail = self.delivered() - mail
            result["sink_cpu_us"] = (self.cpu() - postfix_cpu) / max(mail, 1) * 1e6
        finally:
            server.stop()  # waits for the sends in flight
        result["ok"], result["non_2xx"] = server.answered()
        result["delivered"] = self.delivered()
        self.clear()
        return result

    def stop(self):
        self.proxy.terminate()
        self.proxy.communicate(timeout=10)
        self.postfix.stop()


def relay_rounds(args, workdir: Path, env: dict, results: dict):
    """herald-smtp and the Flask-Mail app through Relay, in interleaved rounds (order alternating)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from postfix_server import unavailable

    reason = unavailable(auth=True)
    if reason:
        print(f"relay: not measured: {reason}", flush=True)
        results["relay_skipped"] = reason
        return
    relay = Relay(workdir, args.delay_ms)
    try:
        names = ("herald", "flaskmail")
        rounds = {k: [] for k in names}
        for i in range(args.relay_rounds):
            for target in names[i % 2:] + names[:i % 2]:
                rounds[target].append(measure(target, f"round {i + 1}/{args.relay_rounds}", args, workdir, env,
                                              relay.relay))
            results["relay_vs_flaskmail"].append(rounds["herald"][i]["rps"] / rounds["flaskmail"][i]["rps"])
            print(f"relay round {i + 1}/{args.relay_rounds}: herald-smtp / Flask-Mail "
                  f"{results['relay_vs_flaskmail'][-1]:.2f}x", flush=True)
        results["relay"] = {k: median_of(v) for k, v in rounds.items()}
    finally:
        relay.stop()


def _smtp_ceiling_process(port: int, threads: int, seconds: float, data: bytes) -> list:
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        jobs = [pool.submit(_smtp_ceiling_client, port, seconds, data) for _ in range(threads)]
        return [x for job in jobs for x in job.result()]  # a failed client raises here


def _smtp_ceiling_client(port: int, seconds: float, data: bytes) -> list:
    latencies = []
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            smtp.sendmail(SENDER, ["user@example.com"], data)
            latencies.append(time.perf_counter() - t0)
    return latencies


def smtp_ceiling(args, workdir: Path, workers: int, threads: int) -> dict:
    """As many processes and threads as gunicorn has, each on one open connection, no HTTP."""
    data = MessageBuilder(load_config({"SMTP_FROM": SENDER, "IDEMPOTENCY_STORE": "memory://", "WEB_CONCURRENCY": "1"})
                          ).build(SendRequest(to="user@example.com", params={"code": "123456"})).data
    sink = Sink(workdir)
    try:
        before = os.times()
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            jobs = [pool.submit(_smtp_ceiling_process, sink.port, threads, args.duration, data) for _ in range(workers)]
            latencies = sorted(x for job in jobs for x in job.result())
        after = os.times()  # the pool's processes have been waited for: their CPU is counted
        delivered = sink.messages()
    finally:
        sink.stop()
    client_cpu = after.children_user + after.children_system - before.children_user - before.children_system
    return {"rps": len(latencies) / args.duration, "p50_ms": percentile(latencies, 50) * 1000,
            "server_cpu_us": client_cpu / len(latencies) * 1e6, "sink_cpu_us": None,
            "p99_ms": percentile(latencies, 99) * 1000, "ok": len(latencies), "non_2xx": 0, "delivered": delivered}


def percentile(sorted_values, p):
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p / 100))]


def latency(target: str, args, workdir: Path, env: dict, chunking: bool = True) -> dict:
    """Sequential requests, one keep-alive HTTP connection, every SMTP reply delayed; the server
    offers CHUNKING unless `chunking` is false."""
    port = free_port()
    delay = subprocess.Popen([sys.executable, str(BENCH / "delay_smtp.py"), str(port), str(args.delay_ms),
                              *(["chunking"] if chunking else [])], stdout=subprocess.PIPE, text=True)
    try:
        delay.stdout.readline()  # "ready"
        server = Gunicorn(target, port, workdir, env)
        times, failures = [], 0
        try:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            for i in range(args.warmup_requests + args.requests):
                body = json.dumps({"channel": "email", "to": f"user{i}@example.com", "subject": "Verification code",
                                   "params": {"code": f"{i:06d}"}})
                headers = {"Content-Type": "application/json", "X-API-Key": API_KEY,
                           "Idempotency-Key": f"latency-{uuid.uuid4()}"}
                t0 = time.perf_counter()
                conn.request("POST", "/v1/send", body, headers)
                response = conn.getresponse()
                response.read()
                if i >= args.warmup_requests:
                    times.append(time.perf_counter() - t0)
                    failures += response.status != 200
            conn.close()
        finally:
            server.stop()
    finally:
        delay.terminate()
        out, _ = delay.communicate(timeout=10)
    counts = json.loads(out.strip().splitlines()[-1])
    times.sort()
    p50, p99 = percentile(times, 50) * 1000, percentile(times, 99) * 1000
    return {"p50_ms": p50, "p99_ms": p99, "p50_rt": p50 / args.delay_ms, "p99_rt": p99 / args.delay_ms,
            "non_2xx": failures, "smtp_waits_per_mail": counts["turns"] / max(counts["messages"], 1),
            "smtp_sessions": counts["sessions"], "smtp_messages": counts["messages"]}


def median_of(rounds):
    merged = {k: statistics.median(r[k] for r in rounds) for k in ("rps", "p50_ms", "p99_ms")}
    for k in ("server_cpu_us", "sink_cpu_us"):
        merged[k] = None if rounds[0][k] is None else statistics.median(r[k] for r in rounds)
    for k in ("ok", "non_2xx", "wrk_errors"):
        merged[k] = sum(r.get(k) or 0 for r in rounds)
    merged["delivered"] = None if rounds[0]["delivered"] is None else sum(r["delivered"] for r in rounds)
    merged["rounds_rps"] = [round(r["rps"]) for r in rounds]
    merged["rounds_shares"] = [r["worker_shares"] for r in rounds]
    merged["rounds_connections"] = [r.get("connections") for r in rounds]
    merged["rounds_restarted"] = [r.get("restarted") or [] for r in rounds]
    return merged


def run_text(r: dict, i: int) -> str:
    """One round's req/s, the workers' CPU shares and connections, and any run measured again."""
    held = r["rounds_connections"][i]
    text = f"{r['rounds_rps'][i]} ({shares_text(r['rounds_shares'][i])}" + \
        (f"; connections {' / '.join(map(str, held))})" if held else ")")
    again = r["rounds_restarted"][i]
    if again:
        text += f"; started again after {len(again)} piled up: " + ", ".join(" / ".join(map(str, x)) for x in again)
    return text


def table(caption: str, columns: list) -> list:
    """A caption and a Markdown table's head: the first column left-aligned, the figures right."""
    return [caption, "", "| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]


def render(results, args, workers, threads) -> str:
    t, lat, bal, rel = results["throughput"], results["latency"], results["balance"], results["relay"]
    lines = []
    if rel:
        lines += table(f"As users run it: a private Postfix with STARTTLS and AUTH (Cyrus SASL), a certificate the "
                       f"apps verify against a private CA, behind a proxy that delivers every reply "
                       f"{args.delay_ms:g} ms late. wrk -t1 -c{args.relay_connections}, {args.relay_duration:g} s per "
                       f"run after {args.warmup:g} s warm-up, median of {args.relay_rounds} interleaved rounds; "
                       f"gunicorn {workers} workers x {threads} threads (herald-smtp on its own worker class with a "
                       f"unique Idempotency-Key per request on the default store; Flask-Mail on stock gthread, "
                       f"connecting, STARTTLS, AUTH per mail). CPU: user + system time of the app's master and "
                       f"workers per request, and of every Postfix process per mail delivered (/proc).",
                       ["app", "mails/s", "vs Flask-Mail", "p50 ms", "p99 ms", "app CPU ms/mail",
                        "Postfix CPU ms/mail", "non-2xx", "200s answered", "delivered"])
        for key in ("herald", "flaskmail"):
            r = rel[key]
            lines.append(f"| {LABELS[key]} | {r['rps']:.0f} | {r['rps'] / rel['flaskmail']['rps']:.2f}x | "
                         f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['server_cpu_us'] / 1000:.2f} | "
                         f"{r['sink_cpu_us'] / 1000:.2f} | {r['non_2xx'] + r['wrk_errors']} | {r['ok']} | "
                         f"{r['delivered']} |")
        lines += [""] + table("Each round's mails/s (the workers' CPU shares; connections each worker held). A stock "
                              "gthread run that left a worker under a third of its fair share of the connections "
                              "is started again at once.",
                              ["round", LABELS["herald"], LABELS["flaskmail"], "herald-smtp / Flask-Mail"])
        for i, ratio in enumerate(results["relay_vs_flaskmail"]):
            lines.append(f"| {i + 1} | {run_text(rel['herald'], i)} | {run_text(rel['flaskmail'], i)} | "
                         f"{ratio:.2f}x |")
        lines.append(f"| median | {rel['herald']['rps']:.0f} | {rel['flaskmail']['rps']:.0f} | "
                     f"{statistics.median(results['relay_vs_flaskmail']):.2f}x |")
        lines.append("")
    elif results.get("relay_skipped"):
        lines += [f"As users run it (Postfix with STARTTLS and AUTH): not measured: {results['relay_skipped']}", ""]
    if bal:
        lines += table(f"Workers' balance: herald-smtp, gunicorn {workers} workers x {threads} threads, one start; "
                       f"{args.balance_runs} wrk runs of {args.balance_seconds:g} s at each connection count, each "
                       "opening its keep-alive connections anew. Each run's workers' CPU shares, busiest first "
                       "(UNEVEN: one worker did more than twice the mean of the others).",
                       ["connections", "median req/s", "busiest worker's share, median (max)", "uneven runs",
                        "every run's shares"])
        for connections, runs in bal.items():
            busiest = [r["shares"][0] for r in runs]
            lines.append(f"| {connections} | {statistics.median(r['rps'] for r in runs):.0f} | "
                         f"{statistics.median(busiest):.2f} ({max(busiest):.2f}) | "
                         f"{sum(uneven(r['shares']) for r in runs)} of {len(runs)} | "
                         + ", ".join(" / ".join(f"{x:.2f}" for x in r["shares"]) for r in runs) + " |")
        lines.append("")
    if t:
        base = t["baseline"]["rps"]
        lines += table(f"Loopback: wrk -t1 -c{args.connections}, {args.duration:g} s per run after "
                       f"{args.warmup:g} s warm-up, median of {args.rounds} rounds of herald-smtp and Flask-Mail back to back (order alternating), the others once; "
                       f"gunicorn {workers} workers x {threads} threads (herald-smtp and the bare endpoint on "
                       f"herald-smtp's worker class, the connection-per-send apps on stock gthread); no TLS, no "
                       f"AUTH; Postfix's smtp-sink on loopback.",
                       ["target", "req/s", "vs connection per send", "p50 ms", "p99 ms", "non-2xx", "200s answered",
                        "sink counted", "CPU us/req (+ sink)"])
        for key in (*APPS, "bare", "smtp"):
            r = t[key]
            sink = "-" if r["delivered"] is None else str(r["delivered"])
            cpu = f"{r['server_cpu_us']:.0f}" + ("" if r["sink_cpu_us"] is None else f" (+ {r['sink_cpu_us']:.0f})")
            lines.append(f"| {LABELS[key]} | {r['rps']:.0f} | {r['rps'] / base:.2f}x | {r['p50_ms']:.1f} | "
                         f"{r['p99_ms']:.1f} | {r['non_2xx']} | {r['ok']} | {sink} | {cpu} |")
        lines += [""] + table("Each run's req/s, workers' CPU shares (each worker's part of the CPU the workers "
                              "used in the measured run, busiest first; UNEVEN: one worker did more than twice the "
                              "mean of the others) and connections each worker held. A stock gthread run that left a worker under a "
                              "third of its fair share of the connections is started again at once.",
                              ["round", *(LABELS[k] for k in ROUNDS), "herald-smtp / Flask-Mail"])
        ratios = results["vs_flaskmail"]
        for i, ratio in enumerate(ratios):
            lines.append(f"| {i + 1} | " + " | ".join(run_text(t[k], i) for k in ROUNDS) + f" | {ratio:.2f}x |")
        lines.append("| median | " + " | ".join(f"{t[k]['rps']:.0f}" for k in ROUNDS) +
                     f" | {statistics.median(ratios):.2f}x |")
        lines += [""] + [f"{LABELS[k]}, one run: {run_text(t[k], 0)}." for k in ("baseline", "bare")] + [""]
    if lat:
        b50 = lat["baseline"]["p50_ms"]
        lines += table(f"Latency: {args.requests} sequential requests (after {args.warmup_requests} warm-up), "
                       f"every SMTP reply delayed {args.delay_ms:g} ms (one round trip); "
                       f"gunicorn {workers} workers x {threads} threads.",
                       ["target", "p50 ms", "p99 ms", "p50 round trips", "p99 round trips",
                        "p50 vs connection per send", "SMTP waits per mail", "non-2xx"])
        for key in (*APPS, "herald-data"):
            r = lat[key]
            lines.append(f"| {LABELS[key]} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['p50_rt']:.2f} | "
                         f"{r['p99_rt']:.2f} | {r['p50_ms'] / b50:.2f}x | {r['smtp_waits_per_mail']:.2f} | "
                         f"{r['non_2xx']} |")
        lines.append("")
    if results.get("cpu_cost"):
        lines += [results["cpu_cost"]["table"], ""]
    lines += ["Targets:"] + [f"- {'PASS' if ok else 'FAIL'}: {what}" for what, ok in targets(results)]
    return "\n".join(lines) + "\n"


def targets(results):
    t, lat = results["throughput"], results["latency"]
    checks = []
    for connections, runs in results["balance"].items():
        bad = sum(uneven(r["shares"]) for r in runs)
        checks.append((f"workers' balance at {connections} connections: {bad} of {len(runs)} runs uneven (0)", bad == 0))
    if "herald" in t and "baseline" in t:
        h, b = t["herald"], t["baseline"]
        checks.append((f"throughput {h['rps'] / b['rps']:.2f}x the connection-per-send baseline (>= 2x)",
                       h["rps"] >= 2 * b["rps"]))
        checks.append((f"herald-smtp non-2xx: {h['non_2xx']} (0)", h["non_2xx"] == 0 and h["wrk_errors"] == 0))
        checks.append((f"every 200 delivered: {h['ok']} answered, {h['delivered']} counted by the sink",
                       h["ok"] == h["delivered"]))
    if results.get("vs_flaskmail"):
        ratios = results["vs_flaskmail"]
        median = statistics.median(ratios)
        checks.append((f"loopback herald-smtp / Flask-Mail, median of {len(ratios)} rounds: {median:.2f}x "
                       f"(>= 1.85x, judged over 5 or more rounds)", median >= 1.85 and len(ratios) >= 5))
        checks.append((f"loopback herald-smtp / Flask-Mail, lowest round: {min(ratios):.2f}x (>= 1.5x)",
                       min(ratios) >= 1.5))
    rel = results["relay"]
    for key in rel:
        checks.append((f"relay, {LABELS[key]}: every 200 delivered: {rel[key]['ok']} answered, "
                       f"{rel[key]['delivered']} delivered by Postfix, {rel[key]['non_2xx']} non-2xx",
                       rel[key]["ok"] == rel[key]["delivered"] and rel[key]["non_2xx"] == 0))
    if "herald" in lat and "baseline" in lat:
        h, b = lat["herald"], lat["baseline"]
        checks.append((f"p50 with {results['delay_ms']:g} ms replies and CHUNKING: {h['p50_rt']:.2f} round trips "
                       f"(<= 1.3)", h["p50_rt"] <= 1.3))
        checks.append((f"p50 {h['p50_ms'] / b['p50_ms']:.2f}x the connection-per-send baseline's (< 0.55x)",
                       h["p50_ms"] < 0.55 * b["p50_ms"]))
    return checks


def cpu_cost(args):
    """CPU per keyed request against a bare Flask endpoint on the same worker class
    (bench/cpu_cost.py, which imports this module's helpers: imported here, not at the top)."""
    from bench import cpu_cost as module
    print("cpu: CPU per keyed request against the bare endpoint (bench/cpu_cost.py)", flush=True)
    result = module.measure(rounds=args.cpu_rounds, log=print)
    result["table"] = module.render(result)
    return result


def commit() -> str:
    """The commit measured, marked when the code under test differs from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "herald_smtp", "app.py", "gunicorn.conf.py",
                "bench/apps.py", "bench/run.py", "bench/send.lua", "bench/delay_smtp.py")
    return git("rev-parse", "--short", "HEAD") + (" with uncommitted changes" if dirty else "")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=8, help="seconds per measured wrk run (8)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of wrk before each measured run (2)")
    parser.add_argument("--rounds", type=int, default=7,
                        help="loopback rounds of herald-smtp and the Flask-Mail app (7)")
    parser.add_argument("--connections", type=int, default=0, help="wrk connections (workers x threads)")
    parser.add_argument("--requests", type=int, default=200, help="sequential requests in latency mode (200)")
    parser.add_argument("--warmup-requests", type=int, default=20, help="unmeasured requests first (20)")
    parser.add_argument("--delay-ms", type=float, default=10, help="SMTP reply delay in latency mode (10)")
    parser.add_argument("--balance-runs", type=int, default=5,
                        help="wrk runs at each of 4, 8 and 16 connections for the workers' balance (5)")
    parser.add_argument("--balance-seconds", type=float, default=3, help="seconds per balance run (3)")
    parser.add_argument("--relay-rounds", type=int, default=5,
                        help="interleaved rounds through Postfix with STARTTLS and AUTH (5)")
    parser.add_argument("--relay-duration", type=int, default=6, help="seconds per measured relay run (6)")
    parser.add_argument("--relay-connections", type=int, default=16, help="wrk connections through Postfix (16)")
    parser.add_argument("--restarts", type=int, default=20,
                        help="times a stock gthread run that piled its connections up is started again (20)")
    parser.add_argument("--cpu-rounds", type=int, default=5, help="rounds of the CPU per keyed request (5)")
    parser.add_argument("--only", choices=["relay", "throughput", "latency", "balance", "cpu"], help="run one mode")
    parser.add_argument("--out", default=str(BENCH / "results"), help="where latest.md and latest.json go")
    args = parser.parse_args()

    workers, threads, env = prepare(args)
    # vs_flaskmail: herald-smtp's req/s over the Flask-Mail app's, one per round.
    results = {"relay": {}, "relay_vs_flaskmail": [], "throughput": {}, "vs_flaskmail": [], "latency": {},
               "balance": {}, "cpu_cost": None, "delay_ms": args.delay_ms, "workers": workers,
               "threads": threads, "cpus": os.cpu_count(), "python": sys.version.split()[0], "commit": commit(),
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Logs and sink counters of this run; kept (git-ignored) if the run fails.
    workdir = Path(tempfile.mkdtemp(prefix="run-", suffix=".tmp", dir=out))
    try:
        if args.only in (None, "relay"):
            relay_rounds(args, workdir, env, results)
        if args.only in (None, "balance"):
            results["balance"] = balance(args, workdir, env)
        if args.only in (None, "throughput"):
            rounds = {k: [] for k in ROUNDS}
            for i in range(args.rounds):
                for target in ROUNDS[i % len(ROUNDS):] + ROUNDS[:i % len(ROUNDS)]:  # order rotating
                    rounds[target].append(measure(target, f"round {i + 1}/{args.rounds}", args, workdir, env))
                results["vs_flaskmail"].append(rounds["herald"][i]["rps"] / rounds["flaskmail"][i]["rps"])
                print(f"round {i + 1}/{args.rounds}: herald-smtp / Flask-Mail {results['vs_flaskmail'][-1]:.2f}x",
                      flush=True)
            results["throughput"] = {k: median_of(v) for k, v in rounds.items()}
            for target in ("baseline", "bare"):
                results["throughput"][target] = median_of([measure(target, "", args, workdir, env)])
            print(f"throughput: {LABELS['smtp']}", flush=True)
            results["throughput"]["smtp"] = smtp_ceiling(args, workdir, workers, threads)
        if args.only in (None, "latency"):
            for target in APPS:
                print(f"latency: {LABELS[target]}", flush=True)
                results["latency"][target] = latency(target, args, workdir, env)
            print(f"latency: {LABELS['herald-data']}", flush=True)
            results["latency"]["herald-data"] = latency("herald", args, workdir, env, chunking=False)
        if args.only in (None, "cpu"):
            results["cpu_cost"] = cpu_cost(args)
    except BaseException:
        print(f"benchmark failed; its logs are in {workdir}", file=sys.stderr)
        raise
    shutil.rmtree(workdir)
    table = render(results, args, workers, threads)
    header = f"herald-smtp benchmark, {results['date']}, commit {results['commit']}, {results['cpus']} CPUs, " \
             f"Python {results['python']}\nCommand: {' '.join(['bench/run.py', *sys.argv[1:]])} (`make bench`)\n\n"
    print("\n" + header + table)
    (out / "latest.md").write_text(header + table)
    (out / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"written: {out / 'latest.md'}, {out / 'latest.json'}")


if __name__ == "__main__":
    main()
