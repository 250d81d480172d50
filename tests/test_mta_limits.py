"""Each MTA's own per-session message limit below ours (SMTP_MAX_MESSAGES_PER_CONNECTION, 100):
a provider may end a session sooner than we would. Through gunicorn (one worker, one thread:
one cached session), every send is 200 and every mail is delivered once.

Exim (smtp_accept_max_per_connection) answers MAIL past its limit with 421; OpenSMTPD
(smtp limit max-mails) with 452, and keeps the session open."""


import pytest

from conftest import API_KEY, unique_key
from mta import codes

TO = "ada.lovelace@example.com"



def send_seven(g):
    """Seven sends on one worker thread: their statuses, what they said ("200" or "503 <error
    message>" a line), and the codes sent."""
    sent = [f"{n:06d}" for n in range(1, 8)]
    answers = [g.post({"to": TO, "body": f"Your code is {code}"}, key=unique_key(), headers={"X-API-Key": API_KEY})
               for code in sent]
    said = "\n".join(f"{status} {body.get('error_message', '')}".strip() for status, body in answers)
    return [status for status, _ in answers], said, sent


@pytest.mark.parametrize("chunking", [True, False], ids=["bdat", "data"])
def test_exims_per_session_limit_below_ours_costs_no_send(gunicorn, make_exim, chunking):
    """smtp_accept_max_per_connection = 3 (ours: 100): Exim answers the 4th MAIL on a session
    with 421. The mail goes on a fresh session; every send is 200 and delivered once."""
    server = make_exim(tls=False, max_per_connection=3)
    g = gunicorn(server.env(API_KEY=API_KEY, SMTP_CHUNKING=str(chunking).lower()), workers=1, threads=1)
    statuses, said, sent = send_seven(g)
    assert statuses == [200] * 7, said
    assert sorted(codes(server.wait_for_messages(7))) == sent
    assert "too many messages in one connection" in server.log()  # the limit was reached
    assert set(server.received()) == {("bdat" if chunking else "data", True)}  # pipelined, as Exim offers


def test_opensmtpds_per_session_limit_below_ours_costs_no_send(gunicorn, make_opensmtpd):
    """`smtp limit max-mails 3` (ours: 100): the 4th MAIL on a session is answered 452, and the
    session stays open. The mail goes on a fresh session; every send is 200 and delivered once."""
    server = make_opensmtpd(max_mails=3)
    g = gunicorn(server.env(API_KEY=API_KEY), workers=1, threads=1)
    statuses, said, sent = send_seven(g)
    assert statuses == [200] * 7, said
    assert sorted(codes(server.wait_for_messages(7))) == sent
    assert 'result="452 4.5.3 Too many recipients: Too many messages sent"' in server.log()  # the limit was reached
