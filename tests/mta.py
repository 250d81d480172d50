"""What the private MTAs the tests start have in common (Postfix, Exim, OpenSMTPD).

Each instance lives in a directory of its own under the system temp dir (its daemons run as
their own users and must reach it; pytest keeps its tree 0700 root), listens on a free
127.0.0.1 port, logs to a file of its own and delivers every mail for example.com to one
Maildir there; nothing relays, so nothing can leave the machine. A reaper process sits between
the tests and the MTA: it passes SIGTERM on and waits for every process the MTA leaves behind.

Exim and OpenSMTPD are not installed (Debian's MTA packages conflict with each other and with
Postfix): `make mtas` downloads Debian's packages and unpacks them into .cache/mtas/root, and
each daemon runs from there inside a private mount namespace (`unshare -m`) in which copies of
/etc/passwd and /etc/group carry the users it wants, and the fixed paths its Debian build
expects (/var/spool, /var/log, /var/lib, /run, /usr/libexec) are directories of the instance.
The host's files are neither read for settings nor touched.
"""

import email
import email.policy
import functools
import glob
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import ROOT, SMTP_PASSWORD, SMTP_USER, free_port

DOMAIN = "example.com"  # the one domain every MTA here takes mail for
REFUSED = f"refused@{DOMAIN}"  # refused with a 5xx at RCPT by every MTA here
UNPACKED = os.path.join(ROOT, ".cache", "mtas", "root")  # where `make mtas` unpacks the packages
START_SECONDS = 10

# Runs between the tests and an MTA: a child subreaper, because Postfix's master exits on
# SIGTERM before the daemons it just signalled, Exim's daemon leaves its SMTP sessions running,
# and this container's PID 1 reaps them late. Once the MTA's main process is gone, whatever it
# left behind gets SIGTERM too; the reaper exits when it has reaped them all.
_REAPER = r"""
import ctypes, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: orphaned daemons are reaped here
libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: a test run that dies stops its MTA too
main = None
def children():
    me = str(os.getpid())
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[1] == me:
                    yield int(name)
        except (OSError, IndexError):
            pass
def stop(*_):
    for pid in [main] if main is not None else list(children()):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
signal.signal(signal.SIGTERM, stop)
main = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ)
code = 0
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        break
    if pid == main:
        code, main = os.waitstatus_to_exitcode(status), None
        stop()
sys.exit(1 if code else 0)
"""


class Unavailable(Exception):
    """The MTA cannot be run here; the message says why (the fixtures skip with it)."""


def started(server):
    """server.start(), or skip the test with the reason the MTA cannot run here."""
    try:
        return server.start()
    except Unavailable as e:
        pytest.skip(str(e))


@functools.cache
def namespace_unavailable():
    """Why a daemon cannot get a private mount namespace here, or None."""
    if os.geteuid() != 0:
        return f"the MTAs' daemons only start as root (these tests run as uid {os.geteuid()})"
    if not shutil.which("unshare"):
        return "no unshare(1) on this machine (Debian: util-linux)"
    try:
        pwd.getpwnam("nobody")  # every MTA here delivers as nobody
    except KeyError:
        return "no 'nobody' user on this machine"
    done = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True, text=True)
    if done.returncode:
        return f"no private mount namespace here (unshare -m: {done.stderr.strip()})"
    return None


def unpacked_unavailable(binary, package):
    """Why `binary` (a path inside the unpacked packages) cannot run here, or None."""
    reason = namespace_unavailable()
    if reason:
        return reason
    path = os.path.join(UNPACKED, binary.lstrip("/"))
    if not os.path.exists(path):
        return (f"{package} is not unpacked in .cache/mtas (`make mtas` downloads Debian's packages "
                "with apt-get download and unpacks them; nothing is installed)")
    ldd = subprocess.run(["ldd", path], capture_output=True, text=True,
                         env={**os.environ, "LD_LIBRARY_PATH": ":".join(library_dirs())})
    missing = sorted({line.split()[0] for line in ldd.stdout.splitlines() if "not found" in line})
    if missing:
        return f"{package} needs libraries this machine lacks: {', '.join(missing)}"
    return None


def library_dirs():
    """The unpacked packages' library directories (libidn12's, for Exim)."""
    return sorted(glob.glob(os.path.join(UNPACKED, "usr", "lib", "*-linux-*")))


def free_id(taken):
    """A system uid or gid no entry in `taken` uses."""
    n = 999
    while n in taken:
        n -= 1
    return n


class MTAServer:
    """One private MTA instance. `keep_dir`: a pytest tmp dir that receives its log at stop.

    A subclass says how to lay its instance out (`_lay_out`, once, and `_configure`, for each
    port tried), how to run it (`_argv`), where it logs (`maillog`), which mail it still holds
    (`_queued`) and why it cannot run (`unavailable`)."""

    name = "mta"
    users = ()  # system users the daemon wants, added to its copy of /etc/passwd

    def __init__(self, keep_dir, certs=None, auth=False):
        if auth and certs is None:
            raise ValueError("auth needs certs: AUTH is only offered after STARTTLS")
        self.keep_dir = keep_dir
        self.certs, self.auth = certs, auth
        self.port = None
        self.root = None
        self._proc = None  # the reaper, parent of the MTA's main process
        self._log_offset = 0
        self.ids = {}  # {user: (uid, gid)} of `users`, as the daemon sees them

    # -- life ---------------------------------------------------------------------

    def start(self):
        """Start and wait for the greeting (raises Unavailable with the reason)."""
        reason = self.unavailable()
        if reason:
            raise Unavailable(reason)
        self.root = tempfile.mkdtemp(prefix=f"herald-{self.name}-")
        os.chmod(self.root, 0o711)  # the daemons, as their own users, pass through to their dirs
        self._lay_out()
        for _ in range(3):  # another process may take the free port before the MTA binds it
            self.port = free_port()
            self._configure()
            if self._spawn():
                self.clear()  # log() starts after the start and its probe
                return self
            if "Address already in use" not in self._all_log():
                break
        tail = "; ".join(self._all_log().strip().splitlines()[-3:])
        self.stop()
        raise Unavailable(f"{self.name} did not start: {tail}")

    def stop(self):
        """Stop the MTA and every process it started, then remove the instance (its log is kept)."""
        self._halt()
        if self.root is not None:
            if os.path.exists(self.maillog):
                shutil.copy(self.maillog, os.path.join(self.keep_dir, f"{self.name}-{self.port}.log"))
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def pids(self):
        """Every process of this instance, zombies included: the reaper and its descendants
        (the reaper adopts every orphan, so nothing the MTA starts escapes it)."""
        if self._proc is None:
            return []
        parent = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat") as f:
                        parent[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError):
                    pass
        found = {self._proc.pid}
        grew = True
        while grew:
            more = {pid for pid, ppid in parent.items() if ppid in found} - found
            found |= more
            grew = bool(more)
        return sorted(pid for pid in found if pid in parent)

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

    def fallback_env(self, n=1, **extra):
        """This server as fallback relay n (SMTP_FALLBACK_<n>_*), for another server's env()."""
        prefix = f"SMTP_FALLBACK_{n}_"
        return {prefix + k[len("SMTP_"):]: v for k, v in self.env(**extra).items() if k != "SMTP_FROM"}

    def messages(self, timeout=5.0):
        """The delivered messages (raw bytes, in delivery order), once every mail the MTA has
        accepted so far has left its queue: an empty list means nothing was delivered."""
        deadline = time.monotonic() + timeout
        while self._queued():
            if time.monotonic() > deadline:
                raise AssertionError(f"mail still in {self.name}'s queue after {timeout}s; its log:\n{self.log()}")
            time.sleep(0.01)
        return [_read(path) for path in self._maildir_files()]

    def wait_for_messages(self, n, timeout=5.0):
        """Wait until at least `n` messages are delivered; returns all of them."""
        deadline = time.monotonic() + timeout
        while len(self._maildir_files()) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self._maildir_files())} of {n} messages delivered after {timeout}s; "
                                     f"{self.name}'s log:\n{self.log()}")
            time.sleep(0.01)
        return self.messages(max(0.0, deadline - time.monotonic()))

    def clear(self):
        """Empty the Maildir and start log() afresh, once earlier mail has left the queue."""
        self.messages()
        for path in self._maildir_files():
            os.unlink(path)
        self._log_offset = os.path.getsize(self.maillog) if os.path.exists(self.maillog) else 0

    def log(self):
        """What the instance logged since the last clear()."""
        try:
            with open(self.maillog, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def ehlo(self, tls=False):
        """The EHLO keywords this server offers (lower case), after STARTTLS with `tls`."""
        import smtplib
        import ssl

        smtp = smtplib.SMTP("localhost", self.port, timeout=10)
        try:
            smtp.ehlo()
            if tls:
                smtp.starttls(context=ssl.create_default_context(cafile=self.certs.ca_file))
                smtp.ehlo()
            features = dict(smtp.esmtp_features)
            smtp.quit()
            return features
        finally:
            smtp.close()

    # -- layout -------------------------------------------------------------------

    @property
    def maillog(self):
        return os.path.join(self.root, "maillog")

    @property
    def maildir(self):
        return os.path.join(self.root, "mail", "Maildir")

    def unavailable(self):
        raise NotImplementedError

    def _lay_out(self):
        raise NotImplementedError

    def _configure(self):
        raise NotImplementedError

    def _argv(self):
        raise NotImplementedError

    def _queued(self) -> bool:
        raise NotImplementedError

    def _log_files(self):
        """Every file the MTA may explain a failed start in, maillog first."""
        return [self.maillog, os.path.join(self.root, "daemon.out")]

    def _path(self, *parts):
        return os.path.join(self.root, *parts)

    def _mkdirs(self, *parts, mode=0o755, owner="root"):
        """An instance directory (parents too), owned by `owner`: a host user or one of `users`."""
        path = self._path(*parts)
        os.makedirs(path, exist_ok=True)
        if owner in self.ids:
            uid, gid = self.ids[owner]
        else:
            entry = pwd.getpwnam(owner)
            uid, gid = entry.pw_uid, entry.pw_gid
        os.chown(path, uid, gid)
        os.chmod(path, mode)
        return path

    def _add_users(self):
        """Write copies of /etc/passwd and /etc/group with `users` added (as system users with
        ids the host does not use), and an ld.so.cache that also knows the unpacked libraries.
        Sets self.ids {user: (uid, gid)}."""
        etc = self._path("etc")
        os.makedirs(etc, exist_ok=True)
        passwd, group = _lines("/etc/passwd"), _lines("/etc/group")
        uids = {int(line.split(":")[2]) for line in passwd}
        gids = {int(line.split(":")[2]) for line in group}
        groups = {line.split(":")[0]: int(line.split(":")[2]) for line in group}
        self.ids = {}
        for user in self.users:
            try:
                entry = pwd.getpwnam(user)
                self.ids[user] = (entry.pw_uid, entry.pw_gid)
                continue
            except KeyError:
                pass
            uid = free_id(uids)
            uids.add(uid)
            if user not in groups:
                groups[user] = free_id(gids)
                gids.add(groups[user])
                group.append(f"{user}:x:{groups[user]}:")
            passwd.append(f"{user}:x:{uid}:{groups[user]}::/nonexistent:/usr/sbin/nologin")
            self.ids[user] = (uid, groups[user])
        for name, lines in (("passwd", passwd), ("group", group)):
            with open(os.path.join(etc, name), "w") as f:
                f.write("".join(line + "\n" for line in lines))
            os.chmod(os.path.join(etc, name), 0o644)
        conf = os.path.join(etc, "ld.so.conf")
        with open(conf, "w") as f:
            f.write("include /etc/ld.so.conf\n" + "".join(d + "\n" for d in library_dirs()))
        subprocess.run(["ldconfig", "-X", "-C", os.path.join(etc, "ld.so.cache"), "-f", conf],
                       check=True, capture_output=True)

    def _namespace(self, binds):
        """The argv prefix that runs a command in a private mount namespace, with the copies
        `_add_users` wrote over /etc/passwd, /etc/group and /etc/ld.so.cache, and each of
        `binds` {fixed path: what is mounted there} in place."""
        etc = self._path("etc")
        mounts = {"/etc/passwd": os.path.join(etc, "passwd"), "/etc/group": os.path.join(etc, "group"),
                  "/etc/ld.so.cache": os.path.join(etc, "ld.so.cache"), **binds}
        script = "".join(f"mount --bind {shlex.quote(src)} {shlex.quote(dst)}\n" for dst, src in mounts.items())
        return [shutil.which("unshare"), "-m", "--propagation", "private", "/bin/sh", "-ec", script + 'exec "$@"', "sh"]

    # -- running ------------------------------------------------------------------

    def _spawn(self) -> bool:
        """Run the MTA under the reaper; True once it greets."""
        out = open(self._path("daemon.out"), "ab")
        self._proc = subprocess.Popen([sys.executable, "-c", _REAPER, *self._argv()],
                                      stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        out.close()
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline and self._proc.poll() is None:
            if self._greets():
                return True
            time.sleep(0.02)
        self._halt()
        return False

    def _halt(self):
        """SIGTERM to the reaper, which passes it to the MTA and then to what it left, and exits
        once it has reaped them all; SIGKILL for whatever is left after 10 s."""
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
        self._proc = None

    def _greets(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                ok = s.makefile("rb").readline().startswith(b"220 ")
                s.sendall(b"QUIT\r\n")
                return ok
        except OSError:
            return False

    def _files_under(self, *parts) -> bool:
        """Is there a file anywhere under this instance path (a queue with mail in it)?"""
        return any(files for _, _, files in os.walk(self._path(*parts)))

    def _maildir_files(self):
        paths = []
        for sub in ("new", "cur"):
            try:
                paths += [e.path for e in os.scandir(os.path.join(self.maildir, sub)) if e.is_file()]
            except FileNotFoundError:
                pass
        return sorted(paths, key=lambda p: (os.stat(p).st_mtime_ns, p))

    def _all_log(self):
        text = ""
        for path in self._log_files():
            try:
                with open(path, errors="replace") as f:
                    text += f.read()
            except FileNotFoundError:
                pass
        return text


def parse(raw):
    """A delivered message, parsed."""
    return email.message_from_bytes(raw, policy=email.policy.default)


def codes(raws):
    """The last word of each message's text: the code a test sent ("Your code is 123456")."""
    return [parse(raw).get_content().split()[-1] for raw in raws]


def alive(pids):
    """Those of `pids` still in /proc, zombies included."""
    return [pid for pid in pids if os.path.exists(f"/proc/{pid}")]


def _lines(path):
    with open(path) as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
