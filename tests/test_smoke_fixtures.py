from conftest import send_json, unique_key


def test_fixture_paths(make_server, make_app):
    for kw in ({}, {"tls": "starttls", "auth": True}, {"tls": "implicit", "auth": True}):
        server = make_server(**kw)
        client = make_app(server.env()).test_client()
        for _ in range(3):
            r = send_json(client, {"to": "bob@example.com", "subject": "Grüße"}, key=unique_key())
            assert r.status_code == 200, (kw, r.json)
        assert len(server.messages) == 3
        assert server.sessions == 1, kw
        assert server.parsed()["Subject"] == "Grüße"
