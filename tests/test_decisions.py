"""The reply decision table (herald_smtp/smtp/decisions.py, README "What each reply means"), row by
row on every path a mail takes: DATA or BDAT, pipelined or not, against scripted servers on loopback."""

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from conftest import CONTRACT_STATUS, ROOT, free_port, wait_for
from fault_server import FaultServer
from herald_smtp import load_config
from herald_smtp.errors import DeliveryUnknown, SendError
from herald_smtp.smtp import decisions
from herald_smtp.smtp.decisions import DEADLINE, DROP, FRESH, KEEP, LOST, NEXT, OK, OUTCOMES, STAGES, UNKNOWN
from herald_smtp.smtp.transport import Transport

SENDER, TO = "noreply@example.com", "user@example.com"
DATA = b"Subject: code\r\n\r\nYour code is 424242\r\n"

# How a mail goes out: what the server offers (SMTP_CHUNKING stays on: BDAT whenever it is offered).
PATHS = {
    "DATA": {},
    "DATA pipelined": {"pipelining": True},
    "BDAT": {"chunking": True},
    "BDAT pipelined": {"pipelining": True, "chunking": True},
}
EVERY_PATH = pytest.mark.parametrize("path", PATHS)


def relay_env(server, n=None):
    """A FaultServer's settings as the primary (n None) or as fallback n."""
    env = server.env()
    if n is None:
        return env
    return {f"SMTP_FALLBACK_{n}_{k[len('SMTP_'):]}": v for k, v in env.items() if k != "SMTP_FROM"}


def transport(primary, *fallbacks, **extra):
    env = relay_env(primary)
    for n, server in enumerate(fallbacks, 1):
        env.update(relay_env(server, n))
    return Transport(load_config({**env, **extra}))


def send(t, timeout=5):
    """The Delivery, or the SendError the send raised."""
    try:
        return t.send(SENDER, TO, DATA, time.monotonic() + timeout)
    except SendError as e:
        return e


# -- the rows the real MTAs showed failing ----------------------------------------------


@EVERY_PATH
@pytest.mark.parametrize("step, reply", [("mail", "451 4.3.0 try again later"), ("mail", "421 4.3.2 closing"),
                                         ("rcpt", "451 4.3.0 try again later")])
def test_a_relay_deferring_the_envelope_hands_the_mail_to_the_fallback(fault_server, path, step, reply):
    primary, fallback = fault_server(**PATHS[path]), fault_server(**PATHS[path])
    primary.fault(step, reply)
    t = transport(primary, fallback)
    try:
        sent = send(t)
        order = [r.name for r in t.relays.order()]
    finally:
        t.close_all()
    assert getattr(sent, "relay", None) == "fallback-1" and not isinstance(sent, SendError), sent
    assert (len(primary.accepted), len(fallback.accepted)) == (0, 1)
    assert order == ["fallback-1", "primary"]  # the primary sits out its cool-down


@EVERY_PATH
@pytest.mark.parametrize("limit", ["421 too many messages in this connection",  # Exim
                                   "452 4.5.3 Too many messages sent"])  # OpenSMTPD, connection kept open
def test_a_per_session_limit_below_ours_costs_a_fresh_session_never_a_failure(fault_server, path, limit):
    server = fault_server(session_limit=(3, limit), **PATHS[path])
    t = transport(server)
    try:
        answers = [send(t) for _ in range(10)]
    finally:
        t.close_all()
    assert [type(a).__name__ for a in answers] == ["Delivery"] * 10
    assert [a.reused for a in answers] == [False, True, True] * 3 + [False]
    assert (len(server.accepted), server.sessions) == (10, 4)


# -- the table, row by row, on every path -------------------------------------------------

STEP = {"greeting": "greeting", "EHLO": "ehlo", "STARTTLS": "starttls", "AUTH": "auth", "MAIL": "mail",
        "RCPT": "rcpt", "DATA": "data", "message": "dot"}  # the FaultServer's name for each stage
REPLY = {"421": "421 4.3.2 closing", "452": "452 4.5.3 Too many messages sent", "4xx": "451 4.3.0 try again later",
         "5xx": "554 5.7.1 refused", LOST: "close", DEADLINE: "stall"}
STAGE_REPLY = {("STARTTLS", "4xx"): "454 4.7.0 TLS not available", ("AUTH", "4xx"): "454 4.7.0 try again later",
               ("AUTH", "5xx"): "535 5.7.8 bad credentials", ("RCPT", "5xx"): "550 5.1.1 no such user"}
TIMEOUT = 1.2  # SMTP_TIMEOUT_SECONDS of the deadline rows: the primary gets half, the fallback the rest


def cases(deadline=False):
    """(path, stage, outcome, reused) for every cell of the table a path can meet: DATA only
    without BDAT; a reused session where reuse can change what happens (a fresh session). The
    deadline cells apart (`deadline`): they wait for it, so they run side by side."""
    for path in PATHS:
        for stage in STAGES:
            if stage == "DATA" and path.startswith("BDAT"):
                continue
            for column in OUTCOMES:
                if column == OK or (stage, column) not in decisions.TABLE or (column == DEADLINE) != deadline:
                    continue
                yield path, stage, column, False
                if decisions.TABLE[(stage, column)].then == FRESH:
                    yield path, stage, column, True


def case_id(case):
    path, stage, column, reused = case
    return f"{path}-{stage}-{column}" + ("-reused" if reused else "")


class Unaccepting:
    """A listener that never accepts, its one-place queue filled: a connect to it waits for ever."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=0)
        self.port = self.listener.getsockname()[1]
        self.queued = socket.create_connection(("127.0.0.1", self.port))

    def close(self):
        self.queued.close()
        self.listener.close()


def primary_for(stage, column, fault_server, certs, options):
    """The primary as the row wants it, and the env that points at it."""
    if stage == "connect":
        if column == LOST:  # connection refused
            return None, {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(free_port()), "SMTP_FROM": SENDER,
                          "SMTP_USE_STARTTLS": "false"}
        hung = Unaccepting()
        return hung, {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(hung.port), "SMTP_FROM": SENDER,
                      "SMTP_USE_STARTTLS": "false"}
    server = fault_server(certs=certs if stage == "STARTTLS" else None, auth=stage == "AUTH", **options)
    return server, server.env()


def cached(t) -> bool:
    """This thread keeps an open session with the primary for its next mail."""
    session = t.sessions.take(t.cfg.relays[0], time.monotonic() + 1)
    if session is None:
        return False
    t.sessions.release(session)
    return not session.closed


def outcome_of(t, timeout):
    try:
        return t.send(SENDER, TO, DATA, time.monotonic() + timeout)
    except SendError as e:
        return e


def run_row(case, fault_server, certs):
    """Send through a primary that answers the row's way, with a healthy fallback behind it and,
    side by side, alone (its answer is the row's code); check what the table says happens."""
    path, stage, column, reused = case
    options = PATHS[path]
    written = path == "BDAT pipelined" and stage in ("MAIL", "RCPT")  # BDAT LAST went out with them
    decision = decisions.decide(stage, column, written)
    timeout = TIMEOUT if column == DEADLINE else 5
    fallback = fault_server(**options)
    (primary, primary_env), (alone, alone_env) = [primary_for(stage, column, fault_server, certs, options)
                                                  for _ in range(2)]
    with_fallback = Transport(load_config({**primary_env, **relay_env(fallback, 1),
                                           "SMTP_TIMEOUT_SECONDS": str(timeout)}))
    only = Transport(load_config({**alone_env, "SMTP_TIMEOUT_SECONDS": str(timeout)}))
    fresh = decision.then == FRESH and reused
    # Each transport on a thread of its own, as a worker thread keeps its sessions.
    threads = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    try:
        if reused:  # the session the thread keeps carried one mail already
            assert type(threads[0].submit(outcome_of, with_fallback, timeout).result()).__name__ == "Delivery"
        if stage != "connect":
            for server in (primary, alone):  # a reused session is refused once; a fresh one works
                server.fault(STEP[stage], STAGE_REPLY.get((stage, column), REPLY[column]), times=1 if reused else None)
        got, answer = [f.result() for f in [threads[0].submit(outcome_of, with_fallback, timeout),
                                            threads[1].submit(outcome_of, only, timeout)]]
        order = [r.name for r in with_fallback.relays.order()]
        kept = threads[0].submit(cached, with_fallback).result()  # before close_all() closes it
        if isinstance(primary, FaultServer):  # the server sees a dropped session go; a fresh one stays
            wait_for(lambda: primary.connections == (decision.session == KEEP or fresh), timeout=3)
            commands = list(primary.commands)  # once a dropped session's QUIT has arrived
    finally:
        for t, thread in zip((with_fallback, only), threads):
            thread.shutdown()
            t.close_all()
        for hung in (primary, alone):
            if isinstance(hung, Unaccepting):
                hung.close()

    moved = decision.then == NEXT or (decision.then == FRESH and not reused)
    if moved:
        assert (getattr(got, "relay", None), type(got).__name__) == ("fallback-1", "Delivery"), got
        assert order == ["fallback-1", "primary"]  # the primary sits out its cool-down
        assert (type(answer), answer.code) == (SendError, decision.code), answer  # when no relay is left
    elif fresh:
        assert (getattr(got, "relay", None), type(got).__name__, got.reused) == ("primary", "Delivery", False), got
        assert primary.sessions == 2  # once more, on a new session of the same relay
        assert order == ["primary", "fallback-1"]  # no cool-down
    else:  # an answer, from this relay: no other tried, no cool-down
        unknown = decision.then == UNKNOWN
        assert (type(got), got.code) == (DeliveryUnknown if unknown else SendError, decision.code), got
        assert (type(answer), answer.code) == (type(got), got.code)
        assert order == ["primary", "fallback-1"]
    assert len(fallback.accepted) == moved  # one copy, through one relay
    if isinstance(primary, FaultServer):
        assert len(primary.accepted) == reused + fresh

    # The session: kept (reset, and cached for the next mail) or dropped.
    assert kept == (decision.session == KEEP or fresh)
    if decision.session == KEEP:
        assert commands[-1] == "RSET"
    elif decision.session == DROP and column in ("452", "4xx", "5xx") and not fresh:
        assert commands[-1] == "QUIT"  # a server that refused but still listens hears goodbye


@pytest.mark.parametrize("case", list(cases()), ids=case_id)
def test_every_row_on_every_path(fault_server, certs, case):
    run_row(case, fault_server, certs)


def test_every_deadline_row_on_every_path(fault_server, certs):
    """The rows where no answer comes by the deadline, all at once: one deadline for all of them."""
    rows = list(cases(deadline=True))
    with ThreadPoolExecutor(len(rows)) as pool:
        futures = {case_id(case): pool.submit(run_row, case, fault_server, certs) for case in rows}
    failed = {}
    for row, future in futures.items():
        try:
            future.result()
        except AssertionError as e:
            failed[row] = str(e).splitlines()[0]
    assert failed == {}


# -- any reply code at all: the seam between smtplib's parse and the table ------------------


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(list(PATHS)), stage=st.sampled_from(["MAIL", "RCPT", "DATA", "message"]),
       code=st.integers(100, 599), lines=st.integers(1, 3))
def test_any_reply_does_what_the_table_says_and_never_makes_two_copies(fault_server, path, stage, code, lines):
    assume(not (stage == "DATA" and path.startswith("BDAT")))
    assume(code // 100 != (3 if stage == "DATA" else 2))  # what lets a mail go on (a FaultServer script refuses)
    primary, fallback = fault_server(**PATHS[path]), fault_server(**PATHS[path])
    reply = "\r\n".join([f"{code}-continued"] * (lines - 1) + [f"{code} scripted"])
    primary.fault(STEP[stage], reply)
    t = transport(primary, fallback)
    try:
        got = send(t)
    finally:
        t.close_all()
    decision = decisions.decide(stage, code)
    if decision.then in (NEXT, FRESH):  # a new session: FRESH is the next relay
        assert (type(got).__name__, got.relay) == ("Delivery", "fallback-1"), got
    else:
        assert (type(got).__name__, got.code) == ("SendError", decision.code), got
    assert primary.accepted == [] and len(fallback.accepted) == (decision.then in (NEXT, FRESH))

    """README "What each SMTP reply means": the same rows, in the same order, as decisions.ROWS."""
    with open(f"{ROOT}/README.md", encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("## What each SMTP reply means"):]
    section = section[:section.index("\n## ", 1)]
    printed = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in STAGES:
            stage, replies, session, then, answer = cells
            status, _, code = answer.strip("`").partition(" ")
            assert answer == "" or CONTRACT_STATUS[code] == int(status), line
            printed.append((stage, tuple(replies.split(", ")), session, then, code))
    assert printed == list(decisions.ROWS)


def test_one_decision_for_every_stage_and_reply():
    """No cell twice (the later row would silently win), none missing: every stage has every
    reply but 452 (MAIL's own) and, before a connection, replies at all."""
    cells = [(stage, column) for stage, columns, *_ in decisions.ROWS for column in columns]
    assert len(cells) == len(set(cells))
    expected = {(stage, column) for stage in STAGES for column in OUTCOMES
                if (column != "452" or stage == "MAIL") and (stage != "connect" or column in (LOST, DEADLINE))}
    assert set(cells) == expected
