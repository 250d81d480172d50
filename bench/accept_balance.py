"""How ways of sharing accept() between worker processes split a client's burst of keep-alive
connections, and how fast they accept a flood. Two forked processes, each an epoll loop that
accepts and holds connections (no HTTP), as gunicorn's workers would:
  shared       one listening socket, every process woken for a connection (gunicorn's default);
  exclusive    the same socket registered with EPOLLEXCLUSIVE: the kernel wakes one process;
  reuseport    a listening socket per process with SO_REUSEPORT: the kernel hashes each
               connection to one of them;
  least-loaded one shared socket, and a process accepts only while no other holds fewer
               connections, by more than an eighth (herald_smtp.http.worker.LoadBoard), else lets the other take it
               for ACCEPT_YIELD before taking it itself (looking again every PAUSED_POLL).
For each: 10 bursts of 4, 8 and 16 connections opened at once (how many runs split unevenly:
one process holding more than twice the other's), then 2000 connections opened as fast as one
client can (accepted per second). `.venv/bin/python bench/accept_balance.py`
"""

import os
import select
import signal
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from herald_smtp.http.worker import ACCEPT_YIELD, PAUSED_POLL, LoadBoard  # noqa: E402

MODES = ("shared", "exclusive", "reuseport", "least-loaded")


def listener(port=0, reuseport=False):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(2048)
    s.setblocking(False)
    return s


def worker(mode, sock, slot, board, counts):
    ep = select.epoll()
    flags = select.EPOLLIN | (select.EPOLLEXCLUSIVE if mode == "exclusive" else 0)
    ep.register(sock.fileno(), flags)
    held, paused_until = {}, 0.0
    while True:
        now = time.monotonic()
        timeout = max(0.0, min(paused_until - now, PAUSED_POLL)) if paused_until else 1.0
        events = ep.poll(timeout)
        now = time.monotonic()
        if paused_until and (now >= paused_until or board.least_loaded(slot, len(held), now)):
            paused_until = 0.0  # the other process had its chance, or took one and holds as many
            ep.register(sock.fileno(), flags)
            try:
                c, _ = sock.accept()
                held[c.fileno()] = c
                ep.register(c.fileno(), select.EPOLLIN)
                board.publish(slot, len(held), now)
            except BlockingIOError:
                pass
        for fd, _ in events:
            if fd == sock.fileno():
                if mode == "least-loaded" and not board.least_loaded(slot, len(held), now):
                    ep.unregister(fd)
                    paused_until = now + ACCEPT_YIELD
                    continue
                try:
                    c, _ = sock.accept()
                except BlockingIOError:
                    continue
                held[c.fileno()] = c
                ep.register(c.fileno(), select.EPOLLIN)
                board.publish(slot, len(held), now)
            elif fd in held:
                if not held[fd].recv(100):  # the client closed it
                    ep.unregister(fd)
                    held.pop(fd).close()
        board.publish(slot, len(held), now)
        counts[slot] = len(held)


def run(mode):
    board = LoadBoard()
    counts = board.cells  # reuse the shared memory: slot 10 and 11 for the counts read here
    shared = listener(reuseport=mode == "reuseport")
    port = shared.getsockname()[1]
    sockets = [shared, listener(port, reuseport=True) if mode == "reuseport" else shared]
    pids = []
    for slot in range(2):
        pid = os.fork()
        if pid == 0:
            try:
                worker(mode, sockets[slot], slot, board, _Counts(counts))
            finally:
                os._exit(0)
        pids.append(pid)
    time.sleep(0.3)
    uneven = {}
    try:
        for n in (4, 8, 16):
            bad = 0
            for _ in range(10):
                conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
                deadline = time.monotonic() + 2
                while sum(_Counts(counts).get()) < n and time.monotonic() < deadline:
                    time.sleep(0.005)
                a, b = _Counts(counts).get()
                bad += max(a, b) > 2 * min(a, b)
                for c in conns:
                    c.close()
                while sum(_Counts(counts).get()) and time.monotonic() < deadline + 2:
                    time.sleep(0.005)
            uneven[n] = bad
        started = time.monotonic()
        conns = []
        for _ in range(2000):
            conns.append(socket.create_connection(("127.0.0.1", port)))
        while sum(_Counts(counts).get()) < 2000 and time.monotonic() - started < 30:
            time.sleep(0.001)
        rate = sum(_Counts(counts).get()) / (time.monotonic() - started)
        split = _Counts(counts).get()
        for c in conns:
            c.close()
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        for sock in set(sockets):
            sock.close()
    return uneven, rate, split


class _Counts:
    """Each process's held count, in cells 40 and 41 of the shared memory."""

    def __init__(self, cells):
        self.cells = cells

    def __setitem__(self, slot, value):
        self.cells[40 + slot] = value

    def get(self):
        return int(self.cells[40]), int(self.cells[41])


def main():
    print("mode: uneven runs of 10 at 4 / 8 / 16 connections; 2000-connection flood: accepted/s (split)")
    for mode in MODES:
        uneven, rate, split = run(mode)
        print(f"  {mode}: {uneven[4]} / {uneven[8]} / {uneven[16]}; {rate:.0f}/s ({split[0]} / {split[1]})", flush=True)


if __name__ == "__main__":
    main()
