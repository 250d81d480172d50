"""The access log's `client`: the peer's address, or, behind a proxy in FORWARDED_ALLOW_IPS, the
address it put in X-Forwarded-For, read as gunicorn's forwarded_allow_ips trusts peers. (nginx in
front of the running service: tests/test_nginx.py.)"""

import ipaddress

import pytest
from gunicorn.config import Config
from hypothesis import given, strategies as st

from herald_smtp.logs import client_address


def gunicorn_cfg(allow):
    cfg = Config()
    cfg.set("forwarded_allow_ips", allow)
    return cfg


@pytest.mark.parametrize("allow, peer, forwarded, client", [
    ("", "127.0.0.1", "203.0.113.5", "127.0.0.1"),  # nobody trusted (the default): the peer
    ("127.0.0.1", "192.0.2.10", "203.0.113.5", "192.0.2.10"),  # a forged header from an untrusted peer
    ("127.0.0.1", "127.0.0.1", None, "127.0.0.1"),  # a trusted peer that says nothing
    ("127.0.0.1", "127.0.0.1", "203.0.113.5", "203.0.113.5"),  # nginx's $proxy_add_x_forwarded_for
    ("127.0.0.1", "127.0.0.1", "198.51.100.1, 203.0.113.5", "203.0.113.5"),  # the client wrote the first
    ("127.0.0.1,10.0.0.0/8", "127.0.0.1", "198.51.100.1, 203.0.113.5, 10.1.2.3", "203.0.113.5"),  # LB -> nginx
    ("127.0.0.1", "127.0.0.1", "203.0.113.5, not-an-address", "127.0.0.1"),  # what the proxy added is unreadable
    ("127.0.0.1", "127.0.0.1", "2001:DB8:0::1", "2001:db8::1"),  # written as an address, not as sent
    ("*", "192.0.2.10", "198.51.100.1, 203.0.113.5", "198.51.100.1"),  # everyone trusted: whatever is leftmost
])
def test_client_address(allow, peer, forwarded, client):
    environ = {"REMOTE_ADDR": peer}
    if forwarded is not None:
        environ["HTTP_X_FORWARDED_FOR"] = forwarded
    assert client_address(environ, gunicorn_cfg(allow)) == client


ITEMS = st.lists(st.one_of(st.ip_addresses().map(str), st.just("127.0.0.1"), st.text(max_size=12)), max_size=5)


@given(ITEMS.map(",".join), st.sampled_from(["127.0.0.1", "192.0.2.10"]))
def test_the_client_is_the_peer_or_an_address_from_the_header(forwarded, peer):
    """Whatever the header holds, the log gets the peer's address or a parsed address taken from
    the header, never the header's text."""
    client = client_address({"REMOTE_ADDR": peer, "HTTP_X_FORWARDED_FOR": forwarded}, gunicorn_cfg("127.0.0.1"))
    if peer != "127.0.0.1":
        assert client == peer
    elif client != peer:
        assert str(ipaddress.ip_address(client)) == client
        assert any(str(ipaddress.ip_address(item.strip())) == client
                   for item in forwarded.split(",") if _is_address(item.strip()))


def _is_address(text):
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
