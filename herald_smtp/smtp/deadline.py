"""Sockets that wait only for what is left of a deadline, plain and TLS.

A socket timeout alone restarts at every recv, so a server dribbling a byte at a time would never
be cut off; these arm the timeout with what is left before every read and write, so no server can
stretch a send past its deadline.
"""

import socket
import ssl
import time

from ..config import Relay


class Deadline:
    """When (time.monotonic()) the session's current work must be over. One per session, shared
    by its plain socket and the TLS socket that replaces it at STARTTLS."""
    __slots__ = ("at",)

    def __init__(self, at: float):
        self.at = at


class _DeadlineIO:
    """Socket methods that wait only for what is left of the deadline."""
    deadline: Deadline

    def _arm(self):
        left = self.deadline.at - time.monotonic()
        if left <= 0:
            raise TimeoutError("SMTP deadline passed")
        self.settimeout(left)

    def recv(self, *args):
        self._arm()
        return super().recv(*args)

    def recv_into(self, *args):
        self._arm()
        return super().recv_into(*args)

    def send(self, *args):
        self._arm()
        return super().send(*args)

    def sendall(self, *args):
        # A plain socket's sendall is bounded as a whole by its timeout; a TLS one calls send().
        self._arm()
        return super().sendall(*args)


class _Socket(_DeadlineIO, socket.socket):
    pass


class _TLSSocket(_DeadlineIO, ssl.SSLSocket):
    """What our TLS contexts wrap sockets in (their sslsocket_class)."""

    @classmethod
    def _create(cls, sock, *args, **kwargs):
        sock._arm()  # the handshake inside is bounded as a whole by the socket's timeout
        tls = super()._create(sock, *args, **kwargs)
        tls.deadline = sock.deadline
        return tls


def tls_context(relay: Relay):
    """The client TLS context for a relay (None without TLS), reading and writing on the deadline.

    The relay's CA file is added to the system's CAs rather than replacing them, so a private
    relay and a relay with a public certificate both verify.
    """
    if not (relay.use_tls or relay.use_starttls):
        return None
    context = ssl.create_default_context()
    if relay.ca_file:
        context.load_verify_locations(cafile=relay.ca_file)
    if relay.skip_tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.sslsocket_class = _TLSSocket
    return context


def connect(host: str, port: int, deadline: Deadline) -> _Socket:
    """socket.create_connection on a deadline socket: every address tried shares the deadline."""
    error = None
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = _Socket(family, kind, proto)
        sock.deadline = deadline
        try:
            sock._arm()
            sock.connect(address)
            return sock
        except OSError as e:
            sock.close()
            if isinstance(e, TimeoutError):
                raise
            error = e
    raise error or OSError("the SMTP host has no address")


def timed_out(e: BaseException, deadline: float) -> bool:
    """smtplib wraps socket timeouts in SMTPServerDisconnected; look through the chain."""
    while e is not None:
        if isinstance(e, TimeoutError):
            return True
        e = e.__cause__ or e.__context__
    return time.monotonic() >= deadline
