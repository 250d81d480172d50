"""The clients of bench/hostile.py (and tests/test_front_door.py), each a process of its own so
that neither the legitimate client's timing nor the hostile traffic waits on another's Python:
`python -m bench.hostile_clients NAME --port P --start-at T --seconds S [options]`, which waits
until time.monotonic() reaches T (one clock for every process on the machine), runs S seconds
and prints one JSON object. Standard library only, so each starts in a few tens of ms.

  legit     one keyed POST /v1/send at a time, each on a new connection: [seconds, status or error]
  flood     RATE new connections a second that never send a byte, held to the end
  drip      CLIENTS chunked POSTs, 1-byte chunks, CHUNK_BYTES of them on the wire every TICK s
  pipeline  CLIENTS connections writing request after request and never reading an answer
  burst     N keep-alive connections opened at once, one keyed send each: seconds to each answer
The hostile clients send no API key: what they cost the service is what anyone can cost it.
"""

import argparse
import asyncio
import http.client
import json
import os
import selectors
import socket
import subprocess
import sys
import time
import uuid

HOST = "127.0.0.1"
CLIENTS = ("legit", "flood", "drip", "pipeline", "burst")


def send_request(i: int, key: str, run: str) -> tuple:
    """The body and headers of legitimate send number i, as Herald sends it."""
    body = json.dumps({"channel": "email", "to": f"user{i % 1000}@example.com", "subject": "Verification code",
                       "template": "login", "locale": "en", "params": {"code": f"{i % 1000000:06d}"}})
    return body, {"Content-Type": "application/json", "X-API-Key": key, "Idempotency-Key": f"hostile-{run}-{i}"}


def legit(port, seconds, key, timeout=30.0, **_):
    """Sends until `seconds` have passed, one at a time, each on a fresh connection closed after
    its answer. Each: [seconds from connect to the whole answer, status or the error's name]."""
    run, results, i = uuid.uuid4().hex[:12], [], 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        body, headers = send_request(i, key, run)
        i += 1
        conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
        started = time.perf_counter()
        try:
            conn.request("POST", "/v1/send", body, headers)
            response = conn.getresponse()
            response.read()
            outcome = response.status
        except (OSError, http.client.HTTPException) as e:
            outcome = type(e).__name__
        finally:
            conn.close()
        results.append([time.perf_counter() - started, outcome])
    return {"sends": results}


def _closed(sock) -> bool:
    """The server has closed (or reset) this non-blocking socket; what it sent is dropped."""
    try:
        while True:
            if not sock.recv(65536):
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def flood(port, seconds, rate=150, hold=0.0, **_):
    """`rate` new connections a second for `seconds`, none sending anything, all held open
    `hold` seconds more, then closed. Non-blocking connects: the rate holds even when the
    server's accept queue is full and the kernel retries the handshakes."""
    socks, started = [], time.monotonic()
    while (elapsed := time.monotonic() - started) < seconds:
        while len(socks) < int(elapsed * rate) + 1:
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex((HOST, port))
            socks.append(s)
        time.sleep(0.002)
    time.sleep(hold)
    closed = sum(_closed(s) for s in socks)
    for s in socks:
        s.close()
    return {"opened": len(socks), "closed_by_server": closed}


def _connect(port, rcvbuf=0, mss=0):
    """A non-blocking connection. rcvbuf: a receive buffer (so a window) this small; mss: segments
    this small. Both the client's choice: with small segments the server's send buffer for the
    connection stays small (Linux sizes it in segments), so answers not read fill it in moments."""
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if mss:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
    s.settimeout(10)
    s.connect((HOST, port))
    s.setblocking(False)
    return s


def drip(port, seconds, clients=30, chunk_bytes=300, tick=0.01, **_):
    """`clients` POST /v1/send with a chunked body that never ends: every `tick` seconds each
    sends `chunk_bytes` bytes of 1-byte chunks ("1\\r\\nx\\r\\n"). A connection the server closes
    is opened again at once."""
    head = (b"POST /v1/send HTTP/1.1\r\nHost: herald-smtp\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    piece = b"1\r\nx\r\n" * (chunk_bytes // 6)
    conns, opened, closed, sent = [], 0, 0, 0
    deadline = time.monotonic() + seconds
    next_tick = time.monotonic()
    while time.monotonic() < deadline:
        while len(conns) < clients:
            try:
                s = _connect(port)
                s.send(head)
            except OSError:
                break  # the server is not taking connections now: try again next tick
            conns.append(s)
            opened += 1
        for s in list(conns):
            try:
                if _closed(s):
                    raise ConnectionResetError
                sent += s.send(piece)
            except BlockingIOError:
                pass  # the server is not reading: this tick's bytes wait
            except OSError:
                conns.remove(s)
                s.close()
                closed += 1
        next_tick += tick
        time.sleep(max(0.0, next_tick - time.monotonic()))
    for s in conns:
        s.close()
    return {"connections": opened, "closed_by_server": closed, "bytes_sent": sent}


def pipeline(port, seconds, clients=20, rcvbuf=0, mss=0, **_):
    """`clients` connections each writing POST /v1/send requests (no key: each is a 401) one after
    another, as fast as the server takes them, and reading nothing (with `rcvbuf` and `mss`, see
    _connect). A connection the server closes is opened again."""
    body = json.dumps({"to": "user@example.com", "params": {"code": "123456"}}).encode()
    request = (b"POST /v1/send HTTP/1.1\r\nHost: herald-smtp\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body)) * 16
    sel = selectors.DefaultSelector()
    opened = closed = written = 0
    deadline = time.monotonic() + seconds

    def open_one():
        nonlocal opened
        try:
            s = _connect(port, rcvbuf, mss)
        except OSError:
            return
        sel.register(s, selectors.EVENT_WRITE, [0])  # offset into `request`
        opened += 1

    for _ in range(clients):
        open_one()
    while (left := deadline - time.monotonic()) > 0:
        for _ in range(clients - len(sel.get_map())):
            open_one()
        for key, _ in sel.select(min(left, 0.05)):
            s, offset = key.fileobj, key.data
            try:
                n = s.send(request[offset[0]:])
            except BlockingIOError:
                continue
            except OSError:
                sel.unregister(s)
                s.close()
                closed += 1
                continue
            written += n
            offset[0] = (offset[0] + n) % len(request)
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    per_request = len(request) // 16
    return {"connections": opened, "closed_by_server": closed, "requests_written": written // per_request}


async def _one_send(port, i, key, run, started, writers):
    """One keyed send on a new connection, left open: [seconds from `started` to the whole
    answer, status]."""
    body, headers = send_request(i, key, run)
    reader, writer = await asyncio.open_connection(HOST, port)
    writers.append(writer)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    writer.write(f"POST /v1/send HTTP/1.1\r\nHost: herald-smtp\r\n{head}Content-Length: {len(body)}\r\n\r\n"
                 f"{body}".encode())
    status_line = await reader.readline()
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return [time.monotonic() - started, int(status_line.split()[1])]


def burst(port, seconds, key, n=200, timeout=30.0, **_):
    """`n` connections opened at the same moment, each sending one keyed request, kept open until
    every answer is in (keep-alive: the server holds them all). Each: [seconds from the start to
    its whole answer, status or the error's name]."""
    async def one(i, started, tag, writers):
        try:
            return await asyncio.wait_for(_one_send(port, i, key, tag, started, writers), timeout)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
            return [time.monotonic() - started, type(e).__name__]

    async def run():
        started, tag, writers = time.monotonic(), uuid.uuid4().hex[:12], []
        results = await asyncio.gather(*(one(i, started, tag, writers) for i in range(n)))
        for writer in writers:
            writer.close()
        return results

    return {"sends": asyncio.run(run())}


def start(name, port, start_at, seconds, **options):
    """Start client `name` in a process of its own; finish(proc) returns what it printed."""
    args = [sys.executable, "-m", "bench.hostile_clients", name, "--port", str(port), "--start-at", repr(start_at),
            "--seconds", repr(seconds), "--options", json.dumps(options)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.Popen(args, cwd=root, stdout=subprocess.PIPE, text=True)


def finish(proc, timeout=120):
    out, _ = proc.communicate(timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"client {proc.args[3]} exited with {proc.returncode}")
    return json.loads(out)


def run(port, seconds, hostile=(), key=None, lead=0.3):
    """The legitimate client (sending with `key`; None: none) for `seconds`, and the hostile ones,
    [(name, options)], starting `lead` s before it and running to its end. Returns (the
    legitimate sends or None, [each hostile client's result])."""
    start_at = time.monotonic() + 0.5  # the processes start and import meanwhile
    procs = [start(name, port, start_at, seconds + lead, **options) for name, options in hostile]
    if key is not None:
        procs.append(start("legit", port, start_at + lead, seconds, key=key))
    results = [finish(p, timeout=seconds + 120) for p in procs]
    return (results.pop()["sends"] if key is not None else None), results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=CLIENTS)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--start-at", type=float, default=0.0, help="time.monotonic() to start at")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--options", default="{}", help="JSON: the client's keyword arguments")
    args = parser.parse_args()
    late = time.monotonic() - args.start_at
    if late < 0:
        time.sleep(-late)
    result = globals()[args.name](args.port, args.seconds, **json.loads(args.options))
    result["late_start_s"] = max(0.0, late)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
