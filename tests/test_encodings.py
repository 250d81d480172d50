"""Text in any script arrives as sent: subjects keep every space through RFC 2047 encoding, control
characters in the text are transfer-encoded (NUL refused), and a sender that could not be written
correctly stops startup with one line (README, "The email on the wire")."""

import json
import random
import re
import subprocess
import sys
from email.header import decode_header, make_header

import pytest

from conftest import ROOT, send_json, unique_key
from herald_smtp import ConfigError, load_config

WORDS = {
    "russian": "Ваш код подтверждения для входа в учётную запись пользователя системы действителен минут".split(),
    "greek": "Ο κωδικός επαλήθευσης για τη σύνδεση στον λογαριασμό σας είναι έγκυρος για λεπτά".split(),
    "french": "Votre code de vérification pour la connexion à votre compte été envoyé à l'équipe".split(),
    "chinese": "您的 验证码 是 请在 十分钟 内 使用 登录 账户 安全".split(),
    "arabic": "رمز التحقق الخاص بك لتسجيل الدخول إلى حسابك صالح لمدة دقائق".split(),
    "hindi": "आपका सत्यापन कोड लॉगिन के लिए है कृपया इसे साझा न करें".split(),
    "mixed": "🔐 code Código ключ κωδικός 確認 123456 x=y =? ?= a_b — naïve".split(),
    "long ascii words": ["x" * 90, "verification", "y" * 61, "code", "z" * 200, "a"],
}


def random_subjects(n, seed=2047):
    rnd = random.Random(seed)
    for i in range(n):
        words = WORDS[list(WORDS)[i % len(WORDS)]]
        yield rnd.choice([" ", " ", " ", "  "]).join(rnd.choice(words) for _ in range(rnd.randint(2, 30)))


def test_every_space_of_a_non_ascii_subject_survives(client, smtp_server):
    subjects = ["Ваш код подтверждения для входа в учётную запись пользователя системы", *random_subjects(320)]
    for subject in subjects:
        r = send_json(client, {"to": "a@example.com", "subject": subject[:998], "body": "123456"}, key=unique_key())
        assert r.status_code == 200, r.get_json()
    assert len(smtp_server.messages) == len(subjects)
    for i, subject in enumerate(subjects):
        raw = smtp_server.messages[i].original_content
        head = raw.split(b"\r\n\r\n", 1)[0]
        assert smtp_server.parsed(i)["subject"] == subject[:998], (subject, head)
        assert max(head) < 0x80 and max(len(line) for line in head.split(b"\r\n")) <= 78
        assert all(len(word) <= 75 for word in re.findall(rb"=\?[^?\s]+\?[bqBQ]\?[^?\s]*\?=", head))


def test_every_space_of_a_non_ascii_sender_name_survives(make_app, smtp_server):
    # Decoded as RFC 2047 says (6.2: whitespace between two encoded words is ignored), by the
    # stdlib's legacy decoder: policy.default's address parser keeps that whitespace in a name.
    names = [name[:300] for name in random_subjects(120, seed=5322)]
    for name in names:
        client = make_app(smtp_server.env(SMTP_FROM_NAME=name.strip())).test_client()
        assert send_json(client, {"to": "a@example.com", "body": "1"}, key=unique_key()).status_code == 200
    for i, name in enumerate(names):
        head = smtp_server.messages[i].original_content.split(b"\r\n\r\n", 1)[0]
        value = re.search(rb"^From: (.*?) ?<noreply@example.com>\r$", head + b"\r", re.M | re.S).group(1)
        assert str(make_header(decode_header(value.decode().replace("\r\n", "")))).strip('"') == name.strip()
        assert max(head) < 0x80 and max(len(line) for line in head.split(b"\r\n")) <= 78
        assert smtp_server.messages[i].mail_from == "noreply@example.com"


def test_control_characters_in_the_text_are_transfer_encoded(client, smtp_server):
    body, html = "code \x1b[1m123456\x1b[0m\x7f end\x0b\x0c\x01", "<p>\x1b[31m123456\x7f</p>"
    r = send_json(client, {"to": "a@example.com", "body": body, "html": html}, key=unique_key())
    assert r.status_code == 200
    raw = smtp_server.messages[-1].original_content
    # On the wire: nothing below 0x20 but CR, LF and tab, no DEL, nothing 8-bit.
    assert not re.search(rb"[\x00-\x08\x0b-\x0c\x0e-\x1f\x7f-\xff]", raw)
    msg = smtp_server.parsed()
    parts = {p.get_content_type(): p for p in msg.iter_parts()}
    assert {p["content-transfer-encoding"] for p in parts.values()} == {"quoted-printable"}
    assert parts["text/plain"].get_content().replace("\r\n", "\n").rstrip("\n") == body
    assert parts["text/html"].get_content().replace("\r\n", "\n").rstrip("\n") == html


@pytest.mark.parametrize("payload", [
    {"body": "code\x00123456"}, {"html": "<p>\x00</p>"}, {"body": "", "params": {"code": "12\x0034"}},
])
def test_nul_in_the_text_is_refused(client, smtp_server, payload):
    r = send_json(client, {"to": "a@example.com", **payload}, key=unique_key())
    assert (r.status_code, r.get_json()["error_code"]) == (400, "validation_failed")
    assert smtp_server.messages == []


@pytest.mark.parametrize("name", [
    "=?utf-8?q?Acme=0D=0ABcc=3A_evil=40x=2Eorg?=",
    "=?UTF-8?B?QWNtZQ0KQmNjOiBldmlsQHgub3Jn?=",
    "Acme =?utf-8?q?=0A?= Codes",
    "=?utf-8?q?Acme=00?=",
])
def test_an_encoded_line_break_in_the_sender_name_stops_startup(name):
    with pytest.raises(ConfigError, match=r"^SMTP_FROM_NAME: contains an encoded control character"):
        load_config({"SMTP_FROM_NAME": name})


def test_an_encoded_sender_name_without_control_characters_is_fine(make_app, smtp_server):
    client = make_app(smtp_server.env(SMTP_FROM_NAME="=?utf-8?q?Acme_Codes?=")).test_client()
    assert send_json(client, {"to": "a@example.com", "body": "1"}, key=unique_key()).status_code == 200
    assert smtp_server.parsed()["from"].addresses[0].display_name == "Acme Codes"


@pytest.mark.parametrize("sender", ["jürgen@example.com", "验证@example.cn"])
def test_a_non_ascii_sender_local_part_is_one_configuration_line(sender):
    proc = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"], cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "SMTP_HOST": "127.0.0.1", "SMTP_FROM": sender,
                               "PORT": "127.0.0.1:1"}, capture_output=True, text=True, timeout=60)
    [line] = (proc.stdout + proc.stderr).splitlines()
    entry = json.loads(line)
    assert proc.returncode == 2 and entry["error"].startswith("SMTP_FROM: the part before @ must be ASCII")
    assert load_config({"SMTP_FROM": "codes@bücher.example"}).smtp_from == "codes@bücher.example"  # an IDN domain is fine
