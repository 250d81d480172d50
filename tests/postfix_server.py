"""A private Postfix smtpd as a test peer, started by the tests themselves.

Its own main.cf and master.cf (`master -c DIR`), queue, data directory and log file, one smtpd
on a free 127.0.0.1 port, and delivery only to a Maildir of its own: every recipient at
example.com goes to one catch-all Maildir, and every other destination is refused at RCPT
(nothing relays, every other transport is `error:`), so nothing can leave the machine.
The system Postfix (/etc/postfix, /var/spool/postfix) is neither read for settings nor touched.

The instance's directory, reaper and reading of the Maildir are tests/mta.py's, shared with
Exim and OpenSMTPD. At stop the log is copied into the pytest tmp dir given (kept for a
post-mortem) and the instance directory is removed.

Options: STARTTLS with a certificate from the tests' trustme CA (optionally required), AUTH
(Cyrus SASL, a sasldb with the tests' user) offered only after STARTTLS, PIPELINING and
CHUNKING as Postfix advertises them (CHUNKING can be turned off), and any main.cf override.
"""

import grp
import os
import pwd
import re
import shutil
import subprocess
import time

import pytest

from conftest import SMTP_PASSWORD, SMTP_USER, _stopped_after
from mta import DOMAIN, REFUSED, MTAServer, started  # noqa: F401 (DOMAIN, REFUSED: for the tests)

SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
SASL_REALM = "herald.test"
QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")  # where a mail waits before delivery


def _built_in(name) -> str:
    """A parameter's compiled-in value (postconf -d: no need for a system main.cf)."""
    postconf = shutil.which("postconf", path=SBIN_PATH)
    return subprocess.run([postconf, "-d", "-h", name], capture_output=True, text=True, check=True).stdout.strip()


def version() -> tuple:
    """Postfix's version as (major, minor), from postconf."""
    return tuple(int(n) for n in re.findall(r"\d+", _built_in("mail_version"))[:2])


def unavailable(auth: bool = False):
    """Why a private Postfix cannot start on this machine, or None."""
    if os.geteuid() != 0:
        return f"Postfix's master only starts as root (these tests run as uid {os.geteuid()})"
    if not shutil.which("postconf", path=SBIN_PATH):
        return "Postfix is not installed (Debian: apt-get install postfix sasl2-bin; .ci/run does)"
    if version() < (3, 4):
        return "Postfix {}.{} is older than 3.4 (no CHUNKING, no maillog_file)".format(*version())
    for user in ("postfix", "nobody"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            return f"no '{user}' user on this machine (Postfix's package creates 'postfix')"
    if auth and not shutil.which("saslpasswd2", path=SBIN_PATH):
        return "sasl2-bin is not installed (Debian: apt-get install sasl2-bin), so no SMTP AUTH"
    return None


class PostfixServer(MTAServer):
    """One private Postfix instance. `keep_dir`: a pytest tmp dir that receives its log at stop."""

    name = "postfix"

    def __init__(self, keep_dir, certs=None, require_tls=False, auth=False, chunking=True, config=None):
        if require_tls and certs is None:
            raise ValueError("require_tls needs certs")
        super().__init__(keep_dir, certs=certs, auth=auth)
        self.require_tls, self.chunking = require_tls, chunking
        self.config = dict(config or {})  # main.cf settings that override the ones below

    def unavailable(self):
        return unavailable(self.auth)

    # -- layout -------------------------------------------------------------------

    @property
    def etc(self):
        return os.path.join(self.root, "etc")

    def _lay_out(self):
        queue, data, mail = (os.path.join(self.root, d) for d in ("queue", "data", "mail"))
        postfix = pwd.getpwnam("postfix")
        nobody = pwd.getpwnam("nobody")
        os.makedirs(os.path.join(self.etc, "sasl"))
        os.mkdir(queue)
        # The queue's own directories as Postfix's post-install makes them (postfix-files),
        # made here because `postfix start` and its checks take seconds.
        postdrop = _group("postdrop", postfix.pw_gid)
        for name, mode, gid in [("active", 0o700, 0), ("bounce", 0o700, 0), ("corrupt", 0o700, 0),
                                ("defer", 0o700, 0), ("deferred", 0o700, 0), ("flush", 0o700, 0),
                                ("hold", 0o700, 0), ("incoming", 0o700, 0), ("private", 0o700, 0),
                                ("saved", 0o700, 0), ("trace", 0o700, 0),
                                ("maildrop", 0o730, postdrop), ("public", 0o710, postdrop)]:
            _mkdir(os.path.join(queue, name), mode, postfix.pw_uid, gid)
        _mkdir(os.path.join(queue, "pid"), 0o755, 0, 0)
        _mkdir(data, 0o700, postfix.pw_uid, postfix.pw_gid)
        _mkdir(mail, 0o700, nobody.pw_uid, nobody.pw_gid)  # virtual(8) delivers as nobody
        main = {
            "compatibility_level": "3.6" if version() >= (3, 6) else "2",  # today's defaults, no warnings
            "queue_directory": queue,
            "data_directory": data,
            "meta_directory": self.etc,
            "maillog_file": self.maillog,
            "maillog_file_prefixes": self.root,
            "myhostname": "postfix.herald.test",
            "mydomain": "herald.test",
            "myorigin": "$myhostname",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.1/32",
            # Nothing is local, nothing relays, every transport but virtual(8) is an error.
            "mydestination": "",
            "relay_domains": "",
            "relayhost": "",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "default_transport": "error:5.7.1 this test server delivers nowhere else",
            "relay_transport": "$default_transport",
            "local_transport": "$default_transport",
            "virtual_mailbox_domains": DOMAIN,
            "virtual_mailbox_base": mail,
            "virtual_mailbox_maps": "static:Maildir/",
            "virtual_uid_maps": f"static:{nobody.pw_uid}",
            "virtual_gid_maps": f"static:{nobody.pw_gid}",
            "smtpd_relay_restrictions": "reject_unauth_destination",
            "smtpd_recipient_restrictions": f"check_recipient_access inline:{{{REFUSED}=REJECT}}"
                                            + (", permit_sasl_authenticated, reject" if self.auth else ""),
            "smtpd_peername_lookup": "no",  # no DNS for 127.0.0.1
            "smtpd_error_sleep_time": "0",  # a refusal answers at once
            "biff": "no",
        }
        if self.certs is not None:
            chain = os.path.join(self.etc, "server.pem")
            self.certs.cert.private_key_and_cert_chain_pem.write_to_path(chain)  # key first, as Postfix wants
            os.chmod(chain, 0o600)
            main.update({
                "smtpd_tls_chain_files": chain,
                "smtpd_tls_security_level": "encrypt" if self.require_tls else "may",
                "smtpd_tls_auth_only": "yes",
                "smtpd_tls_received_header": "yes",
                "smtpd_tls_loglevel": "1",
            })
        if self.auth:
            main.update({
                "smtpd_sasl_auth_enable": "yes",
                "smtpd_sasl_type": "cyrus",
                "smtpd_sasl_path": "smtpd",
                "cyrus_sasl_config_path": os.path.join(self.etc, "sasl"),
                "smtpd_sasl_local_domain": SASL_REALM,
                "smtpd_sasl_security_options": "noanonymous",
                "smtpd_sasl_authenticated_header": "yes",
            })
            self._write_sasl(postfix)
        if not self.chunking:
            main["smtpd_discard_ehlo_keywords"] = "chunking"
        main.update(self.config)
        self._write(os.path.join(self.etc, "main.cf"), "".join(f"{k} = {v}\n" for k, v in main.items()))

    def _write_sasl(self, postfix):
        sasldb = os.path.join(self.etc, "sasldb2")
        self._write(os.path.join(self.etc, "sasl", "smtpd.conf"),
                    f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\nsasldb_path: {sasldb}\n"
                    "mech_list: PLAIN LOGIN\n")
        saslpasswd2 = shutil.which("saslpasswd2", path=SBIN_PATH)
        subprocess.run([saslpasswd2, "-f", sasldb, "-c", "-p", "-u", SASL_REALM, SMTP_USER],
                       input=SMTP_PASSWORD.encode(), check=True, capture_output=True)
        os.chown(sasldb, postfix.pw_uid, postfix.pw_gid)  # smtpd reads it as `postfix`
        os.chmod(sasldb, 0o600)

    def _master_cf(self):
        # No chroot (it would need copies of /etc), only the services this setup uses.
        return f"""\
127.0.0.1:{self.port} inet n - n - - smtpd
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
tlsmgr unix - - n 1000? 1 tlsmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
flush unix n - n 1000? 0 flush
error unix - - n - - error
retry unix - - n - - error
virtual unix - n n - - virtual
anvil unix - - n - 1 anvil
postlog unix-dgram n - n - 1 postlogd
"""

    @staticmethod
    def _write(path, text):
        with open(path, "w") as f:
            f.write(text)
        # Postfix rereads a table written in the last second every 0.3 s until it is older
        # (a "cool down" against half-written files): that alone made a start take 2 s.
        past = time.time() - 60
        os.utime(path, (past, past))

    # -- running ------------------------------------------------------------------

    def _configure(self):
        self._write(os.path.join(self.etc, "master.cf"), self._master_cf())

    def _argv(self):
        return [os.path.join(_built_in("daemon_directory"), "master"), "-c", self.etc]

    def _queued(self) -> bool:
        return any(self._files_under("queue", name) for name in QUEUES)


def _mkdir(path, mode, uid, gid):
    os.mkdir(path)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def _group(name, default):
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return default


@pytest.fixture(scope="module")
def postfix_server(certs, tmp_path_factory):
    """One Postfix for a test module: STARTTLS with the tests' CA, AUTH (conftest's SMTP_USER and
    SMTP_PASSWORD) after STARTTLS, PIPELINING, CHUNKING. Use `postfix` for a cleared one."""
    server = started(PostfixServer(tmp_path_factory.mktemp("postfix"), certs=certs, auth=True))
    yield server
    server.stop()


@pytest.fixture
def postfix(postfix_server):
    """The module's Postfix with an empty Maildir and a fresh log()."""
    postfix_server.clear()
    return postfix_server


@pytest.fixture
def make_postfix(certs, tmp_path):
    """Factory for another setup, stopped after the test:
    make_postfix(tls=True, require_tls=False, auth=False, chunking=True, config={main.cf: value})."""
    yield from _stopped_after(
        lambda tls=True, **kwargs: started(PostfixServer(tmp_path, certs=certs if tls else None, **kwargs)))
