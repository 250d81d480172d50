"""A private Postfix smtpd as a test peer, started by the tests themselves.

Its own main.cf and master.cf (`master -c DIR`), queue, data directory and log file, one smtpd
on a free 127.0.0.1 port, and delivery only to a Maildir of its own: every recipient at
example.com goes to one catch-all Maildir, and every other destination is refused at RCPT
(nothing relays, every other transport is `error:`), so nothing can leave the machine.
The system Postfix (/etc/postfix, /var/spool/postfix) is neither read for settings nor touched.

The instance lives in a directory of its own under the system temp dir, not in pytest's tmp
tree: Postfix's daemons run as the `postfix` user and must reach their data directory and the
Maildir, and pytest keeps its tree 0700 root. At stop the log is copied into the pytest tmp dir
given (kept for a post-mortem) and the instance directory is removed.

Options: STARTTLS with a certificate from the tests' trustme CA (optionally required), AUTH
(Cyrus SASL, a sasldb with the tests' user) offered only after STARTTLS, PIPELINING and
CHUNKING as Postfix advertises them (CHUNKING can be turned off), and any main.cf override.
"""

import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import SMTP_PASSWORD, SMTP_USER, free_port

SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
DOMAIN = "example.com"  # the one domain it takes mail for
REFUSED = f"refused@{DOMAIN}"  # answered 554 5.7.1 at RCPT (a check_recipient_access REJECT)
SASL_REALM = "herald.test"
QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")  # where a mail waits before delivery
START_SECONDS = 10

# Runs between the tests and Postfix's master: a child subreaper, because the master exits on
# SIGTERM before the daemons it just signalled, and this container's PID 1 reaps them late.
_REAPER = r"""
import ctypes, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: orphaned Postfix daemons are reaped here
libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: a test run that dies stops its Postfix too
master = None
def stop(*_):
    if master is not None:
        try:
            os.kill(master, signal.SIGTERM)
        except ProcessLookupError:
            pass
signal.signal(signal.SIGTERM, stop)
master = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ)
code = 0
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        break
    if pid == master:
        code, master = os.waitstatus_to_exitcode(status), None
sys.exit(1 if code else 0)
"""


class PostfixUnavailable(Exception):
    """Postfix cannot be run here; the message says why (the fixtures skip with it)."""


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


class PostfixServer:
    """One private Postfix instance. `keep_dir`: a pytest tmp dir that receives its log at stop."""

    def __init__(self, keep_dir, certs=None, require_tls=False, auth=False, chunking=True, config=None):
        if (require_tls or auth) and certs is None:
            raise ValueError("require_tls and auth need certs: AUTH is only offered after STARTTLS")
        self.keep_dir = keep_dir
        self.certs, self.require_tls, self.auth, self.chunking = certs, require_tls, auth, chunking
        self.config = dict(config or {})  # main.cf settings that override the ones below
        self.port = None
        self.root = None
        self._proc = None  # the reaper, parent of the master
        self._master = None
        self._log_offset = 0

    # -- life ---------------------------------------------------------------------

    def start(self):
        """Start and wait for the greeting (raises PostfixUnavailable with the reason)."""
        reason = unavailable(self.auth)
        if reason:
            raise PostfixUnavailable(reason)
        self.root = tempfile.mkdtemp(prefix="herald-postfix-")
        os.chmod(self.root, 0o711)  # the daemons, as `postfix`, pass through to data/ and mail/
        self._lay_out()
        for _ in range(3):  # another process may take the free port before the master binds it
            self.port = free_port()
            self._write(os.path.join(self.etc, "master.cf"), self._master_cf())
            if self._spawn():
                return self
            if "Address already in use" not in self._all_log():
                break
        tail = "; ".join(self._all_log().strip().splitlines()[-3:])
        self.stop()
        raise PostfixUnavailable(f"Postfix did not start: {tail}")

    def stop(self):
        """Stop the master and every daemon, then remove the instance (its log is kept)."""
        self._halt()
        if self.root is not None:
            if os.path.exists(self.maillog):
                shutil.copy(self.maillog, os.path.join(self.keep_dir, f"postfix-{self.port}.log"))
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def pids(self):
        """Every process of this instance, zombies included: the reaper and the master's session."""
        if self._proc is None:
            return []
        found = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(name) == self._proc.pid or (self._master and int(fields[3]) == self._master):  # field 6: session
                found.append(int(name))
        return found

    # -- what a test reads --------------------------------------------------------

    def env(self, **extra):
        """Environment for herald-smtp pointing at this server (as SMTPServer.env does)."""
        env = {
            "SMTP_HOST": "127.0.0.1" if self.certs is None else "localhost",  # the certificate's name
            "SMTP_PORT": str(self.port),
            "SMTP_FROM": f"noreply@{DOMAIN}",
            "SMTP_USE_STARTTLS": "false" if self.certs is None else "true",
            "SMTP_USE_TLS": "false",
        }
        if self.certs is not None:
            env["SMTP_CA_FILE"] = self.certs.ca_file
        if self.auth:
            env.update(SMTP_USER=SMTP_USER, SMTP_PASSWORD=SMTP_PASSWORD)
        env.update(extra)
        return env

    def messages(self, timeout=5.0):
        """The delivered messages (raw bytes, in delivery order), once every mail Postfix has
        accepted so far has left its queue: an empty list means nothing was delivered."""
        deadline = time.monotonic() + timeout
        while self._queued():
            if time.monotonic() > deadline:
                raise AssertionError(f"mail still in Postfix's queue after {timeout}s; its log:\n{self.log()}")
            time.sleep(0.01)
        return [_read(path) for path in self._maildir_files()]

    def wait_for_messages(self, n, timeout=5.0):
        """Wait until at least `n` messages are delivered; returns all of them."""
        deadline = time.monotonic() + timeout
        while len(self._maildir_files()) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self._maildir_files())} of {n} messages delivered after {timeout}s; "
                                     f"Postfix's log:\n{self.log()}")
            time.sleep(0.01)
        return self.messages(max(0.0, deadline - time.monotonic()))

    def clear(self):
        """Empty the Maildir and start log() afresh, once earlier mail has left the queue."""
        self.messages()
        for path in self._maildir_files():
            os.unlink(path)
        self._log_offset = os.path.getsize(self.maillog) if os.path.exists(self.maillog) else 0

    def log(self):
        """What the instance logged since the last clear() (Postfix's own lines, maillog_file)."""
        try:
            with open(self.maillog, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    # -- layout -------------------------------------------------------------------

    @property
    def etc(self):
        return os.path.join(self.root, "etc")

    @property
    def maillog(self):
        return os.path.join(self.root, "maillog")

    @property
    def maildir(self):
        return os.path.join(self.root, "mail", "Maildir")

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

    def _spawn(self) -> bool:
        """Run the master under the reaper; True once its smtpd greets."""
        master = os.path.join(_built_in("daemon_directory"), "master")
        out = open(os.path.join(self.root, "master.out"), "ab")
        self._proc = subprocess.Popen([sys.executable, "-c", _REAPER, master, "-c", self.etc],
                                      stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        out.close()
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline and self._proc.poll() is None:
            if self._greets():
                with open(os.path.join(self.root, "queue", "pid", "master.pid")) as f:
                    self._master = int(f.read().split()[0])
                return True
            time.sleep(0.02)
        self._halt()
        return False

    def _halt(self):
        """SIGTERM to the reaper, which passes it to the master (that signals its daemons) and
        exits once it has reaped them all; SIGKILL for whatever is left after 10 s."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            for pid in self.pids():
                _kill(pid)
            self._proc.wait()
        self._proc = self._master = None

    def _greets(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                ok = s.makefile("rb").readline().startswith(b"220 ")
                s.sendall(b"QUIT\r\n")
                return ok
        except OSError:
            return False

    def _queued(self) -> bool:
        for name in QUEUES:
            for _, _, files in os.walk(os.path.join(self.root, "queue", name)):
                if files:
                    return True
        return False

    def _maildir_files(self):
        paths = []
        for sub in ("new", "cur"):
            try:
                paths += [e.path for e in os.scandir(os.path.join(self.maildir, sub)) if e.is_file()]
            except FileNotFoundError:
                pass
        return sorted(paths, key=lambda p: (os.stat(p).st_mtime_ns, p))

    def _all_log(self):
        """The maillog, then whatever the master wrote to stderr before its logger ran."""
        text = ""
        for name in ("maillog", "master.out"):
            try:
                with open(os.path.join(self.root, name), errors="replace") as f:
                    text += f.read()
            except FileNotFoundError:
                pass
        return text


def _mkdir(path, mode, uid, gid):
    os.mkdir(path)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def _group(name, default):
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return default


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _started(server):
    try:
        return server.start()
    except PostfixUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def postfix_server(certs, tmp_path_factory):
    """One Postfix for a test module: STARTTLS with the tests' CA, AUTH (conftest's SMTP_USER and
    SMTP_PASSWORD) after STARTTLS, PIPELINING, CHUNKING. Use `postfix` for a cleared one."""
    server = _started(PostfixServer(tmp_path_factory.mktemp("postfix"), certs=certs, auth=True))
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
    servers = []

    def make(tls=True, **kwargs):
        server = PostfixServer(tmp_path, certs=certs if tls else None, **kwargs)
        servers.append(server)
        return _started(server)

    yield make
    for server in servers:
        server.stop()
