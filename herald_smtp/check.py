"""`python -m herald_smtp check`: would a send work with this configuration?

Loads the configuration as the service does (ENV_FILE or .env, then the real environment on top), reports
every problem it finds, then goes as far as a real send (EHLO, STARTTLS, AUTH, MAIL FROM) and
says RSET instead of sending, and prints what each relay offers and so which path a mail takes
through it. Prints no secret, no SMTP host and no recipient.
"""

import os
import re
import time

from .config import Config, ConfigError, environment, load_config, warnings
from .errors import SendError
from .store.base import StoreUnavailable
from .store.opener import open_store, sqlite_path
from .logs import mask
from .smtp.message import MessageBuilder, SendRequest
from .smtp.transport import Transport

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def run(send_to: str = "", out=print) -> int:
    """Print one line per finding and a verdict line last; return the exit status."""
    try:
        env = environment()  # as the service: the env file, with the real environment on top
    except ConfigError as e:
        out(f"problem: {e}")
        out("check failed: 1 configuration problem(s); the service would not start")
        return EXIT_CONFIG
    cfg, problems = _load(env)
    for problem in problems:
        out(f"problem: {problem}")
    if cfg is None:
        out(f"check failed: {len(problems)} configuration problem(s); the service would not start")
        return EXIT_CONFIG
    out("ok: configuration loaded")
    for _, warning in warnings(cfg):
        out(f"warning: {warning}")
    if not cfg.smtp_configured:
        out("check failed: SMTP_HOST and SMTP_FROM must be set; every send would answer 503")
        return EXIT_FAILED
    try:
        out(f"ok: idempotency store usable{_check_store(cfg)}")
    except SendError as err:
        out(f"check failed: {err.message}")
        return EXIT_FAILED
    builder, transport = MessageBuilder(cfg), Transport(cfg)
    failed, errors = [], []
    for relay in cfg.relays:  # one line each
        try:
            offer = transport.probe(relay, builder.sender, time.monotonic() + cfg.smtp_timeout_seconds)
            out(f"ok: {relay.name}: SMTP on port {relay.port} ({_mode(relay)}) accepted the sender; "
                f"RSET, nothing sent; {_offered(offer)}")
        except SendError as err:
            out(f"problem: {relay.name}: {err.message}")
            failed.append(relay.name)
            errors.append(err)
    if len(failed) == len(cfg.relays):
        out(f"check failed: {errors[0].message}" if len(failed) == 1 else "check failed: every relay would fail")
        return EXIT_FAILED
    if send_to:
        try:
            out(f"ok: test message sent to {mask(_send_test(cfg, builder, transport, send_to))}")
        except SendError as err:
            out(f"check failed: {err.message}")
            return EXIT_FAILED
    if failed:
        out(f"check failed: {', '.join(failed)} would fail; sends would go through the other relays")
        return EXIT_FAILED
    out("check passed: a send would work")
    return EXIT_OK


def _load(env):
    """(Config or None, problems). load_config stops at the first bad variable: set that one
    aside and load again, so one run names every bad variable."""
    env, problems = dict(env), []
    while True:
        try:
            cfg = load_config(env)
        except ConfigError as e:
            problems.append(str(e))
            name = re.match(r"[A-Z_]+", str(e))
            if name is None or name.group() not in env:
                return None, problems
            del env[name.group()]
            continue
        return (None if problems else cfg), problems


def _mode(relay) -> str:
    tls = "implicit TLS" if relay.use_tls else "STARTTLS" if relay.use_starttls else "no TLS"
    return tls + (", AUTH" if relay.user else "")


def _offered(offer) -> str:
    """What the relay offers and so which path a mail takes (README "Checking the configuration")."""
    extensions = ", ".join(offer.extensions) or "none of PIPELINING, CHUNKING, SIZE, AUTH, STARTTLS"
    return f"offers {extensions}; {offer.tls or 'no TLS'}; mail goes by {offer.path}"


def _check_store(cfg: Config) -> str:
    """Raises SendError if sends would fail on the store; else what the ok line adds."""
    url = cfg.idempotency_store
    path = sqlite_path(url)
    if path is not None:
        # Look, do not create: a file made by root here would lock out the service user.
        target = path if os.path.exists(path) else os.path.dirname(path) or "."
        while not os.path.exists(target):  # the service creates missing directories
            target = os.path.dirname(target) or "."
        if not os.access(target, os.R_OK | os.W_OK):
            raise SendError("provider_down", "IDEMPOTENCY_STORE: this user cannot write the SQLite file "
                                             "or its directory; sends would answer 503")
    elif not url.startswith("memory://"):
        n = cfg.idempotency_wait_replicas
        store = open_store(url, cfg.idempotency_max_entries, cfg.sender_scope, replicas=n)
        try:
            store.get("herald-smtp-check")
            confirming = store.confirming_replicas() if n else 0
        except StoreUnavailable:
            raise SendError("provider_down", "idempotency store (Redis) unreachable; sends would answer 503") from None
        finally:
            store.close()
        if confirming < n:
            raise SendError("provider_down", f"IDEMPOTENCY_WAIT_REPLICAS is {n} but {confirming} Redis replica(s) "
                                             "confirmed a write; sends with a key would answer 503")
        return (f"; a key counts once {n} replica(s) have it (IDEMPOTENCY_WAIT_REPLICAS)" if n else
                "; keys are not waited on a replica (IDEMPOTENCY_WAIT_REPLICAS=0)")
    return ""


def _send_test(cfg: Config, builder: MessageBuilder, transport: Transport, to: str) -> str:
    envelope = builder.build(SendRequest(
        to=to, subject="herald-smtp check",
        body="This test message was sent by `python -m herald_smtp check --send-to`.\n"
             "If you can read it, herald-smtp can deliver mail."))
    try:
        transport.send(envelope.sender, envelope.recipient, envelope.data, time.monotonic() + cfg.smtp_timeout_seconds)
    finally:
        transport.close_all()
    return envelope.recipient
