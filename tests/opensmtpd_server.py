"""A private OpenSMTPD (Debian 12's opensmtpd 6.8, unpacked by `make mtas`) as a test peer.

It runs as Debian's build expects to run: as root, its privilege-separated processes as the users
opensmtpd and opensmtpq, chrooted into /var/lib/opensmtpd/empty, its queue in /var/spool/smtpd,
its control socket in /run, its delivery helpers in /usr/libexec/opensmtpd; in its private mount
namespace those are directories of the instance (tests/mta.py). In the foreground (`-d`), it
logs to the instance's maillog. One listener on a free 127.0.0.1 port; every mail for example.com
goes to one Maildir (delivered as nobody), refused@example.com is refused at RCPT, every other
domain too.

It offers SIZE, 8BITMIME, DSN, ENHANCEDSTATUSCODES; no PIPELINING, no CHUNKING. Its per-session
limit (`smtp limit max-mails`, 100 by default) answers MAIL past it with 452 and keeps the
session open. STARTTLS (`tls=True`) is offered, but with OpenSSL 3 Debian 12's build fails every
handshake (its privilege-separated RSA key: upstream issues 1171 and 1239): `tls_works()` says.
"""

import os
import smtplib
import ssl

import pytest

from conftest import _stopped_after
from mta import DOMAIN, REFUSED, UNPACKED, MTAServer, started, unpacked_unavailable

SMTPD = "/usr/sbin/smtpd"
TLS_BROKEN = ("OpenSMTPD 6.8 as Debian 12 builds it fails every TLS handshake with OpenSSL 3 "
              "('SSL routines::EVP lib': upstream issues 1171 and 1239)")


class OpenSMTPDServer(MTAServer):
    """One private OpenSMTPD. max_mails: its per-session limit. tls: offer STARTTLS with a
    certificate from the tests' CA."""

    name = "opensmtpd"
    users = ("opensmtpd", "opensmtpq")

    def __init__(self, keep_dir, certs=None, max_mails=None):
        super().__init__(keep_dir, certs=certs)
        self.max_mails = max_mails

    def unavailable(self):
        return unpacked_unavailable(SMTPD, "OpenSMTPD (opensmtpd)")

    def tls_works(self) -> bool:
        """Does a STARTTLS handshake with this server succeed?"""
        smtp = smtplib.SMTP("localhost", self.port, timeout=10)
        try:
            smtp.starttls(context=ssl.create_default_context(cafile=self.certs.ca_file))
            smtp.quit()
            return True
        except (ssl.SSLError, smtplib.SMTPException, OSError):
            return False
        finally:
            smtp.close()

    def sessions(self):
        """The SMTP sessions opened since the last clear()."""
        return self.log().count(" smtp connected ")

    # -- layout -------------------------------------------------------------------

    def _lay_out(self):
        self._add_users()
        self._mkdirs("var", "spool", mode=0o755)  # smtpd makes its queue, smtpd/, in here
        self._mkdirs("var", "lib", "opensmtpd", "empty", mode=0o755)  # the chroot
        self._mkdirs("run", mode=0o755)
        self._mkdirs("mail", mode=0o700, owner="nobody")
        if self.certs is not None:
            self.certs.cert.cert_chain_pems[0].write_to_path(self._path("etc", "cert.pem"))
            self.certs.cert.private_key_pem.write_to_path(self._path("etc", "key.pem"))
            os.chmod(self._path("etc", "key.pem"), 0o600)  # smtpd refuses a key others may read

    def _configure(self):
        listen = f"listen on 127.0.0.1 port {self.port} hostname opensmtpd.herald.test"
        lines = []
        if self.certs is not None:
            lines += [f'pki localhost cert "{self._path("etc", "cert.pem")}"',
                      f'pki localhost key "{self._path("etc", "key.pem")}"']
            listen += " tls pki localhost"
        lines.append(listen)
        if self.max_mails is not None:
            lines.append(f"smtp limit max-mails {self.max_mails}")
        lines += [
            'table catchall { "@" = "nobody" }',  # every recipient is the one Maildir's
            f'action "maildir" maildir "{self.maildir}" user "nobody" virtual <catchall>',
            f'match from any for rcpt-to "{REFUSED}" reject',
            f'match from any for domain "{DOMAIN}" action "maildir"',
        ]
        with open(self._path("etc", "smtpd.conf"), "w") as f:
            f.write("".join(line + "\n" for line in lines))

    # -- running ------------------------------------------------------------------

    def _argv(self):
        binds = {"/var/spool": self._path("var", "spool"), "/var/lib": self._path("var", "lib"),
                 "/run": self._path("run"), "/usr/libexec": os.path.join(UNPACKED, "usr", "libexec")}
        return self._namespace(binds) + [os.path.join(UNPACKED, SMTPD.lstrip("/")), "-d",
                                         "-f", self._path("etc", "smtpd.conf")]

    @property
    def maillog(self):
        return self._path("daemon.out")  # in the foreground (-d) it logs to its standard error

    def _log_files(self):
        return [self.maillog]

    def _queued(self) -> bool:
        return any(self._files_under("var", "spool", "smtpd", d) for d in ("incoming", "queue", "temporary"))


@pytest.fixture(scope="module")
def opensmtpd_server(tmp_path_factory):
    """One OpenSMTPD for a test module, plain SMTP. Use `opensmtpd` for a cleared one."""
    server = started(OpenSMTPDServer(tmp_path_factory.mktemp("opensmtpd")))
    yield server
    server.stop()


@pytest.fixture
def opensmtpd(opensmtpd_server):
    """The module's OpenSMTPD with an empty Maildir and a fresh log()."""
    opensmtpd_server.clear()
    return opensmtpd_server


@pytest.fixture
def make_opensmtpd(certs, tmp_path):
    """Factory for another setup, stopped after the test: make_opensmtpd(tls=False, max_mails=None)."""
    yield from _stopped_after(
        lambda tls=False, **kwargs: started(OpenSMTPDServer(tmp_path, certs=certs if tls else None, **kwargs)))
