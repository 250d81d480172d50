"""One deadline for the whole send, on every byte (README "Idempotency"): whatever the SMTP server
does at whatever stage (dribbling its replies a byte at a time, stalling a TLS handshake, no longer
reading the data), the answer comes by SMTP_TIMEOUT_SECONDS plus half a second, through gunicorn.
A key's reservation outlives its send, so no second send of a key starts while the first is in flight."""

import concurrent.futures
import email
import email.policy
import signal
import time

import pytest

from conftest import json_lines, unique_key

TIMEOUT = 2  # SMTP_TIMEOUT_SECONDS in these tests
SLACK = 0.5  # what an answer may take beyond the deadline
MAIL = {"to": "user@example.com", "subject": "Your code", "body": "Your code is 424242"}
BIG = {**MAIL, "body": "0123456789 " * 800_000}  # 8.8 MB: twice what the socket buffers can hold

# stage: (server options, faults in order, request, status and error_code of the answer)
STAGES = {
    "greeting": ({}, [("greeting", "dribble")], MAIL, (504, "timeout")),
    "EHLO": ({}, [("ehlo", "dribble")], MAIL, (504, "timeout")),
    "STARTTLS": ({"tls": "starttls"}, [("starttls", "dribble")], MAIL, (504, "timeout")),
    "STARTTLS handshake": ({"tls": "starttls"}, [("handshake", "stall")], MAIL, (504, "timeout")),
    "EHLO over TLS": ({"tls": "starttls"}, [("tls-ehlo", "dribble")], MAIL, (504, "timeout")),
    "AUTH over TLS": ({"tls": "starttls", "auth": True}, [("auth", "dribble")], MAIL, (504, "timeout")),
    "implicit TLS handshake": ({"tls": "implicit"}, [("greeting", "stall")], MAIL, (504, "timeout")),
    "MAIL": ({}, [("mail", "dribble")], MAIL, (504, "timeout")),
    "RCPT": ({}, [("rcpt", "dribble")], MAIL, (504, "timeout")),
    "DATA": ({}, [("data", "dribble")], MAIL, (504, "timeout")),
    "pipelined MAIL, RCPT, DATA": ({"pipelining": True}, [("data", "dribble")], MAIL, (504, "timeout")),
    "the data, unread": ({"rcvbuf": 4096}, [("message", "stall")], BIG, (504, "timeout")),
    "final reply": ({}, [("dot", "dribble")], MAIL, (504, "timeout")),
    "RSET after a refusal": ({}, [("rcpt", "550 5.1.1 no such user"), ("rset", "dribble")], MAIL,
                             (400, "invalid_destination")),
}


def _service(fault_server, gunicorn, certs, tls=None, **options):
    server = fault_server(certs=certs if tls else None, **options)
    env = server.env(SMTP_TIMEOUT_SECONDS=str(TIMEOUT), HTTP_BODY_LIMIT_BYTES=str(16 << 20))
    if tls == "implicit":
        env.update(SMTP_USE_TLS="true", SMTP_USE_STARTTLS="false")
    return server, gunicorn(env, workers=1, threads=2)


def _timed(post, *args, **kwargs):
    started = time.monotonic()
    status, body = post(*args, **kwargs)
    return status, body, time.monotonic() - started


@pytest.mark.serial  # fifteen stages at once, each timed to half a second: needs both cores
def test_every_stage_dribbled_or_stalled_is_answered_by_the_deadline(fault_server, gunicorn, certs):
    services = {}
    for stage, (options, faults, request, _) in STAGES.items():
        server, service = _service(fault_server, gunicorn, certs, **options)
        for step, action in faults:
            server.fault(step, action)
        services[stage] = (server, service, request)

    # All at once: each stage's answer is timed on its own, and the whole test takes one deadline.
    with concurrent.futures.ThreadPoolExecutor(len(services)) as pool:
        futures = {stage: pool.submit(_timed, service.post, request, unique_key())
                   for stage, (_, service, request) in services.items()}
        answers = {stage: f.result() for stage, f in futures.items()}

    got = {stage: ((status, body.get("error_code")), round(elapsed, 2)) for stage, (status, body, elapsed) in answers.items()}
    assert {stage: answer for stage, (answer, _) in got.items()} == {s: STAGES[s][3] for s in STAGES}
    assert {stage: t for stage, (_, t) in got.items() if t > TIMEOUT + SLACK} == {}
    assert all(not server.accepted for server, _, _ in services.values())
    # The data really was cut off by the deadline, not sent in full and then waited for.
    assert services["the data, unread"][0].received == []


def test_a_key_is_not_sent_again_while_its_first_send_is_in_flight(fault_server, gunicorn, certs):
    server, service = _service(fault_server, gunicorn, certs)
    server.fault("dot", "dribble")  # the final 250 takes 7 s, past the deadline and a short lease
    key = unique_key()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(_timed, service.post, MAIL, key)
        while "MAIL" not in server.commands:
            time.sleep(0.01)
        retries = []
        while not first.done():  # Herald's caller retrying, again and again
            retries.append(service.post(MAIL, key, timeout=10)[0])
            time.sleep(0.1)
        status, body, elapsed = first.result()
        answered = time.monotonic()

    assert (status, body["error_code"]) == (504, "timeout") and elapsed <= TIMEOUT + SLACK
    assert retries and all(s == 504 for s in retries)  # each waited for the first, none sent
    mails = [t for verb, t in zip(server.commands, server.command_times) if verb == "MAIL"]
    assert len([t for t in mails if t < answered - 0.05]) == 1


def test_after_an_unknown_outcome_the_retry_carries_the_same_message_id(fault_server, gunicorn, certs):
    server, service = _service(fault_server, gunicorn, certs)
    server.fault("dot", "dribble", times=1)
    key = unique_key()

    status, body = service.post(MAIL, key)
    assert (status, body["error_code"]) == (504, "timeout")  # the data went out; its 250 never came
    assert service.post(MAIL, key) == (200, {"ok": True, "message_id": key, "provider": "smtp"})
    service.post(MAIL, unique_key())
    service.post(MAIL)  # no key

    ids = [email.message_from_bytes(m, policy=email.policy.default)["Message-ID"] for m in server.received]
    assert len(ids) == 4 and ids[0] == ids[1]  # both copies for the key: mail systems can collapse them
    assert len(set(ids[1:])) == 3  # another key, and no key: other ids
    assert all(key not in i and i.endswith("@example.com>") for i in ids)

    metrics = service.metrics()
    assert metrics["herald_smtp_delivery_unknown_total"] == 1
    log = service.stop()
    unknown = [line for line in json_lines(log) if line.get("event") == "delivery unknown"]
    assert [(u["level"], u["idempotency_key"], u["error_code"]) for u in unknown] == [("warning", key, "timeout")]


def test_worker_exit_says_quit_within_its_bound_to_a_dribbling_server(fault_server, gunicorn, certs):
    server, service = _service(fault_server, gunicorn, certs)
    assert service.post(MAIL, unique_key())[0] == 200  # a session is now open and idle
    server.fault("quit", "dribble")

    started = time.monotonic()
    service.stop(signal.SIGTERM)

    assert time.monotonic() - started < 2 + 1.5  # QUIT gets 2 s, then the connection is closed
    assert "QUIT" in server.commands
