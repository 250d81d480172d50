"""`python -m herald_smtp check`: goes as far as a real send, sends nothing, says why not in one line."""

import os
import subprocess
import sys

import pytest

from conftest import API_KEY, ROOT, SMTP_PASSWORD, free_port


def check(env, *args):
    """Run the command as an operator would; returns (exit status, output lines)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SMTP_", "API_KEY", "IDEMPOTENCY_"))}
    full.update({"API_KEY": API_KEY}, **env)
    proc = subprocess.run([sys.executable, "-m", "herald_smtp", "check", *args], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, (proc.stdout + proc.stderr).splitlines()


def store(tmp_path):
    return {"IDEMPOTENCY_STORE": f"sqlite:///{tmp_path}/idem.sqlite3"}


def test_passes_against_a_live_server_without_sending(make_server, tmp_path):
    server = make_server(tls="starttls", auth=True)
    status, lines = check({**server.env(), **store(tmp_path)})
    assert status == 0, lines
    assert lines[-1] == "check passed: a send would work"
    assert server.messages == []
    # It went as far as MAIL FROM, then reset and said goodbye.
    assert server.handler.commands == {"MAIL": 1, "RSET": 1, "QUIT": 1}
    assert SMTP_PASSWORD not in "\n".join(lines) and API_KEY not in "\n".join(lines)
    assert not (tmp_path / "idem.sqlite3").exists()  # looked at, not created


@pytest.mark.parametrize("env, way", [({}, "BDAT pipelined"), ({"SMTP_CHUNKING": "false"}, "DATA pipelined")])
def test_each_relays_line_says_what_it_offers_and_which_path_a_mail_takes(fault_server, make_server, certs, tmp_path,
                                                                          env, way):
    primary = fault_server(certs=certs, auth=True, pipelining=True, chunking=True)
    fallback = make_server()  # aiosmtpd in clear: SIZE, no PIPELINING, no CHUNKING, no AUTH
    relays = {**primary.env(**env), **{f"SMTP_FALLBACK_1_{k[5:]}": v for k, v in fallback.env().items()
                                        if k != "SMTP_FROM"}}
    status, lines = check({**relays, **store(tmp_path)})
    assert status == 0, lines
    assert f"ok: primary: SMTP on port {primary.port} (STARTTLS, AUTH) accepted the sender; RSET, nothing sent; " \
           f"offers PIPELINING, CHUNKING, AUTH PLAIN LOGIN, STARTTLS; TLSv1.3; mail goes by {way}" in lines, lines
    assert f"ok: fallback-1: SMTP on port {fallback.port} (no TLS) accepted the sender; RSET, nothing sent; " \
           "offers SIZE 33554432; no TLS; mail goes by DATA" in lines
    assert primary.received == [] and fallback.messages == []


def test_send_to_delivers_one_test_message(make_server, tmp_path):
    server = make_server(tls="starttls", auth=True)
    status, lines = check({**server.env(), **store(tmp_path)}, "--send-to", "ops.person@example.org")
    assert status == 0, lines
    assert [m.rcpt_tos for m in server.messages] == [["ops.person@example.org"]]
    assert server.parsed()["Subject"] == "herald-smtp check"
    assert "ok: test message sent to ***@example.org" in lines
    assert "ops.person" not in "\n".join(lines)


def test_closed_port_fails_with_one_clear_line(tmp_path):
    env = {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(free_port()), "SMTP_FROM": "noreply@example.com",
           "SMTP_USE_STARTTLS": "false", **store(tmp_path)}
    status, lines = check(env)
    assert status == 1
    assert lines[-1] == "check failed: SMTP server unreachable"
    assert "127.0.0.1" not in "\n".join(lines)


def test_bad_credentials_fail_without_printing_a_password(make_server, tmp_path):
    server = make_server(tls="starttls", auth=True)
    status, lines = check({**server.env(SMTP_PASSWORD="wrong-password-42"), **store(tmp_path)})
    assert status == 1
    assert lines[-1] == "check failed: SMTP authentication failed; check SMTP_USER and SMTP_PASSWORD"
    output = "\n".join(lines)
    assert "wrong-password-42" not in output and SMTP_PASSWORD not in output
    assert server.handler.commands["MAIL"] == 0


def test_a_refused_sender_fails(make_server, tmp_path):
    server = make_server()
    server.handler.mail_reply = "550 5.7.1 sender not allowed"
    status, lines = check({**server.env(), **store(tmp_path)})
    assert status == 1
    assert lines[-1] == "check failed: SMTP server rejected the sender (550)"


@pytest.mark.parametrize("action, verdict", [
    ("close", "check failed: connection to the SMTP server was lost"),
    ("stall", "check failed: SMTP server did not answer before the deadline"),
])
def test_a_server_lost_at_mail_from_fails_with_one_clear_line(fault_server, tmp_path, action, verdict):
    server = fault_server()
    server.fault("mail", action)
    status, lines = check({**server.env(SMTP_TIMEOUT_SECONDS="1"), **store(tmp_path)})
    assert (status, lines[-1]) == (1, verdict)
    assert not any("Traceback" in line for line in lines)


def test_a_server_without_starttls_is_not_used_in_clear(make_server, tmp_path):
    server = make_server()  # plain, offers no STARTTLS
    status, lines = check({**server.env(SMTP_USE_STARTTLS="true"), **store(tmp_path)})
    assert status == 1
    assert lines[-1] == "check failed: SMTP server does not offer STARTTLS; refusing to send in clear"


def test_every_configuration_problem_is_reported(tmp_path):
    env = {"SMTP_PORT": "abc", "SMTP_USE_TLS": "true", "LOG_LEVEL": "loud", "API_KEY_FILE": str(tmp_path / "none"),
           "SMTP_PASSWORD": "hunter2-secret", **store(tmp_path)}
    status, lines = check(env)
    assert status == 2
    problems = [line for line in lines if line.startswith("problem: ")]
    assert [p.split(":")[1].split()[0] for p in problems] == ["API_KEY_FILE", "SMTP_PORT", "LOG_LEVEL", "SMTP_USE_TLS"]
    assert lines[-1] == "check failed: 4 configuration problem(s); the service would not start"
    assert "hunter2" not in "\n".join(lines)


def test_unconfigured_smtp_and_open_service_are_reported(tmp_path):
    status, lines = check({"API_KEY": "", "PORT": "127.0.0.1:8084", **store(tmp_path)})
    assert status == 1
    assert "warning: API_KEY is empty: anyone who can reach the service can send mail through it" in lines
    status, lines = check({"API_KEY": "", "PORT": ":8084", **store(tmp_path)})
    assert "warning: API_KEY is empty and the service listens on 0.0.0.0:8084, beyond this host" in lines[1]
    assert lines[-1] == "check failed: SMTP_HOST and SMTP_FROM must be set; every send would answer 503"


def test_unreachable_redis_store_fails(smtp_server):
    status, lines = check({**smtp_server.env(), "IDEMPOTENCY_STORE": f"redis://127.0.0.1:{free_port()}/0"})
    assert status == 1
    assert lines[-1] == "check failed: idempotency store (Redis) unreachable; sends would answer 503"
    assert smtp_server.sessions == 0


def test_help_lists_the_commands():
    proc = subprocess.run([sys.executable, "-m", "herald_smtp", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0
    assert "check" in proc.stdout and "without sending" in " ".join(proc.stdout.split())
    proc = subprocess.run([sys.executable, "-m", "herald_smtp", "check", "--help"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "--send-to ADDRESS" in proc.stdout


def test_redis_without_the_replicas_wait_asks_for_fails(smtp_server, redis_url):
    """The test Redis has no replica: with IDEMPOTENCY_WAIT_REPLICAS=1 every keyed send would be
    503, and check says so; with 0 it says keys are not waited on a replica."""
    status, lines = check({**smtp_server.env(), "IDEMPOTENCY_STORE": redis_url, "IDEMPOTENCY_WAIT_REPLICAS": "1"})
    assert status == 1
    assert lines[-1] == ("check failed: IDEMPOTENCY_WAIT_REPLICAS is 1 but 0 Redis replica(s) confirmed a write; "
                         "sends with a key would answer 503")
    status, lines = check({**smtp_server.env(), "IDEMPOTENCY_STORE": redis_url})
    assert status == 0, lines
    assert "ok: idempotency store usable; keys are not waited on a replica (IDEMPOTENCY_WAIT_REPLICAS=0)" in lines


def test_redis_with_a_replica_that_confirms_passes(smtp_server, tmp_path):
    """A real master and its replica: the test write is confirmed, as a keyed send's would be."""
    from redis_servers import RedisProcesses

    procs = RedisProcesses(tmp_path)
    try:
        master = procs.server()
        procs.replica(master)
        env = {**smtp_server.env(), "IDEMPOTENCY_STORE": f"redis://127.0.0.1:{master}/0", "IDEMPOTENCY_WAIT_REPLICAS": "1"}
        status, lines = check(env)
        assert status == 0, lines
        assert "ok: idempotency store usable; a key counts once 1 replica(s) have it (IDEMPOTENCY_WAIT_REPLICAS)" in lines
    finally:
        procs.stop()
