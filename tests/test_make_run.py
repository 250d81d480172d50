"""`make run` in a terminal: a mail reaches the catcher, and Ctrl-C ends both quietly."""

import json
import os
import pty
import select
import signal
import time
import urllib.request

from conftest import ROOT, free_port, listening


def _read(fd, until, seconds):
    """What the terminal shows, read until `until(text)` or `seconds` pass (or the end)."""
    out = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not until(out.decode(errors="replace")):
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the other side of the terminal closed
                break
            if not chunk:
                break
            out += chunk
    return out.decode(errors="replace")


def test_ctrl_c_ends_make_run_quietly(tmp_path):
    http_port, capture_port = free_port(), free_port()
    env_file = tmp_path / "env"
    # Not the developer's .env: no API_KEY here, and a store of the test's own rather than the
    # default file in /dev/shm, which another checkout on this machine may have written.
    env_file.write_text(f"IDEMPOTENCY_STORE=sqlite:///{str(tmp_path).lstrip('/')}/idem.sqlite3\n")
    pid, fd = pty.fork()  # the child leads a session with the terminal as its controlling tty
    if pid == 0:
        os.chdir(ROOT)
        for name in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS"):  # under `make test`: a top-level make, as typed
            os.environ.pop(name, None)
        os.environ.update(PORT=f"127.0.0.1:{http_port}", ENV_FILE=str(env_file), WEB_CONCURRENCY="1")
        os.execvp("make", ["make", "run", f"CAPTURE_PORT={capture_port}"])
    try:
        shown = ""
        deadline = time.monotonic() + 30
        while True:  # one worker answering: its signal handlers are in place
            shown += _read(fd, lambda text: False, 0.2)
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=1).read()
                break
            except OSError:
                assert time.monotonic() < deadline, shown
        request = urllib.request.Request(
            f"http://127.0.0.1:{http_port}/v1/send", method="POST", headers={"Content-Type": "application/json"},
            data=json.dumps({"to": "alice@example.com", "params": {"code": "424242"}}).encode())
        assert json.loads(urllib.request.urlopen(request, timeout=10).read())["ok"] is True
        shown += _read(fd, lambda text: "END MESSAGE" in text, 10)
        assert "Your verification code is: 424242" in shown

        os.write(fd, b"\x03")  # Ctrl-C: SIGINT to the terminal's foreground process group
        after = _read(fd, lambda text: False, 15)
        _, status = os.waitpid(pid, 0)
        pid = None
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    assert "Shutting down: Master" in after
    assert "***" not in after and "Segmentation fault" not in after, after
    # make ends as the user asked, by SIGINT, after its recipe ended well; nothing is left listening.
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGINT or os.waitstatus_to_exitcode(status) == 0
    assert not listening(http_port) and not listening(capture_port)
