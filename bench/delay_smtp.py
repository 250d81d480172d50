"""An SMTP sink whose every reply arrives a set time after the command that caused it, or a
proxy that delays a real server's replies the same way.

`python bench/delay_smtp.py PORT DELAY_MS [chunking]`. It models a relay across a WAN: the delay
is on the wire, not in the server, so commands the client pipelines (RFC 2920; PIPELINING is
offered) are answered together one delay later, and the number of waits the client makes is the
number of round trips. With `chunking` it offers CHUNKING (RFC 3030) too and takes BDAT. On SIGTERM it prints {"sessions", "messages", "turns"} as one JSON line: a turn
is one such wait (the greeting, or a batch of commands read at once).

`python bench/delay_smtp.py PORT DELAY_MS proxy UPSTREAM_PORT`: a TCP proxy to 127.0.0.1:UPSTREAM_PORT
(a private Postfix) that passes every byte from the server on DELAY_MS after it arrived, in order,
and the client's at once. It cannot read the session (STARTTLS encrypts it), so it delays whatever
the server writes, TLS handshake included: each reply, and each handshake flight, is one round trip
later. On SIGTERM it prints {"sessions", "turns"}: a turn is one read from the server.
"""

import asyncio
import json
import signal
import sys

stats = {"sessions": 0, "messages": 0, "turns": 0}


class DelayedSMTP(asyncio.Protocol):
    def __init__(self, delay: float, chunking: bool):
        self.delay, self.chunking = delay, chunking
        self.buffer = b""
        self.in_data = False
        self.chunk_left, self.last_chunk = 0, False  # bytes of a BDAT chunk still to come
        self.due = 0.0

    def connection_made(self, transport):
        self.transport = transport
        stats["sessions"] += 1
        self._reply([b"220 delay-sink ESMTP"])

    def data_received(self, data):
        self.buffer += data
        replies = []
        while True:
            if self.chunk_left:
                taken = min(self.chunk_left, len(self.buffer))
                self.buffer, self.chunk_left = self.buffer[taken:], self.chunk_left - taken
                if self.chunk_left:
                    break
                if self.last_chunk:
                    stats["messages"] += 1
                replies.append(b"250 2.0.0 Ok: queued" if self.last_chunk else b"250 2.0.0 Ok: chunk")
                continue
            line, sep, rest = self.buffer.partition(b"\r\n")
            if not sep:
                break
            self.buffer = rest
            if self.in_data:
                if line == b".":
                    self.in_data = False
                    stats["messages"] += 1
                    replies.append(b"250 2.0.0 Ok: queued")
                continue
            if line[:5].upper() == b"BDAT ":
                words = line.split()
                self.chunk_left, self.last_chunk = int(words[1]), words[-1].upper() == b"LAST"
                if self.chunk_left == 0:  # an empty last chunk
                    stats["messages"] += self.last_chunk
                    replies.append(b"250 2.0.0 Ok: queued")
                continue
            replies.append(self._answer(line.split(b" ", 1)[0].upper()))
        if replies:
            self._reply(replies)

    def _answer(self, verb: bytes) -> bytes:
        if verb == b"EHLO":
            return b"250-delay-sink\r\n250-PIPELINING\r\n" + (b"250-CHUNKING\r\n" if self.chunking else b"") + \
                b"250 8BITMIME"
        if verb == b"DATA":
            self.in_data = True
            return b"354 End data with <CR><LF>.<CR><LF>"
        if verb == b"QUIT":
            return b"221 2.0.0 Bye"
        if verb in (b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP"):
            return b"250 2.0.0 Ok"
        return b"502 5.5.2 Error: command not recognized"

    def _reply(self, replies):
        stats["turns"] += 1
        loop = asyncio.get_running_loop()
        # Strictly later than the previous batch, so replies keep their order.
        self.due = max(loop.time() + self.delay, self.due + 1e-6)
        payload = b"".join(r + b"\r\n" for r in replies)
        loop.call_at(self.due, self._write, payload, replies[-1].startswith(b"221"))

    def _write(self, payload: bytes, close: bool):
        if not self.transport.is_closing():
            self.transport.write(payload)
            if close:
                self.transport.close()


class DelayProxy(asyncio.Protocol):
    """One client connection, passed on to the upstream server; the server's bytes are delayed."""

    def __init__(self, delay: float, upstream_port: int):
        self.delay, self.upstream_port = delay, upstream_port
        self.early = []  # what the client sent before the upstream connection was made
        self.upstream = None

    def connection_made(self, transport):
        self.transport = transport
        stats["sessions"] += 1
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self):
        loop = asyncio.get_running_loop()
        try:
            _, self.upstream = await loop.create_connection(lambda: _Upstream(self), "127.0.0.1", self.upstream_port)
        except OSError:
            self.transport.close()
            return
        if self.transport.is_closing():  # the client left meanwhile
            self.upstream.closing = True
            self.upstream.transport.close()
            return
        for data in self.early:
            self.upstream.transport.write(data)
        self.early = None

    def data_received(self, data):
        if self.early is not None:
            self.early.append(data)
        else:
            self.upstream.transport.write(data)

    def connection_lost(self, exc):
        if self.upstream is not None:
            self.upstream.closing = True
            self.upstream.transport.close()


class _Upstream(asyncio.Protocol):
    def __init__(self, client: DelayProxy):
        self.client, self.due, self.closing = client, 0.0, False

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        stats["turns"] += 1
        self._later(self.client.transport.write, data)

    def connection_lost(self, exc):
        if not self.closing:  # the server closed first (after 221): the client hears it as late
            self._later(lambda: self.client.transport.close())

    def _later(self, fn, *args):
        loop = asyncio.get_running_loop()
        self.due = max(loop.time() + self.client.delay, self.due + 1e-6)  # in order
        loop.call_at(self.due, lambda: None if self.client.transport.is_closing() else fn(*args))


async def main(port: int, delay: float, chunking: bool, upstream_port: int = 0):
    loop = asyncio.get_running_loop()
    if upstream_port:
        del stats["messages"]  # the proxy cannot see them
        server = await loop.create_server(lambda: DelayProxy(delay, upstream_port), "127.0.0.1", port, backlog=256)
    else:
        server = await loop.create_server(lambda: DelayedSMTP(delay, chunking), "127.0.0.1", port, backlog=256)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    async with server:
        await stop.wait()
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    proxy = sys.argv[3:4] == ["proxy"]
    asyncio.run(main(int(sys.argv[1]), float(sys.argv[2]) / 1000, sys.argv[3:] == ["chunking"],
                     int(sys.argv[4]) if proxy else 0))
