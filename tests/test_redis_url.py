"""IDEMPOTENCY_STORE's Redis URL forms: what each means, and a bad one stops startup in one line."""

import pytest

from herald_smtp import ConfigError, load_config
from herald_smtp.redis_url import Target, parse, redacted


def test_sentinel_url_names_the_sentinels_the_master_and_the_options(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-")
    target = parse(f"rediss+sentinel://app:p%40ss@10.0.0.1,10.0.0.2:26380,[::1]:26381/herald-main/3"
                   f"?sentinel_password=s3&ssl_ca_certs={ca}&ssl_check_hostname=false")
    assert target == Target("sentinel", (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("::1", 26381)), "herald-main",
                            3, "app", "p@ss", True,
                            {"sentinel_password": "s3", "ssl_ca_certs": str(ca), "ssl_check_hostname": False})


def test_cluster_url_names_its_seed_nodes():
    target = parse("redis+cluster://:secret@r1:7000,r2")
    assert (target.kind, target.nodes, target.password, target.tls) == ("cluster", (("r1", 7000), ("r2", 6379)),
                                                                        "secret", False)


def test_single_server_forms_are_unchanged():
    assert parse("redis://cache:6379/2").kind == "server"
    assert parse("rediss://cache?ssl_cert_reqs=none").options == {"ssl_cert_reqs": "none"}
    assert parse("unix:///run/redis.sock?db=1").options == {"db": 1}


@pytest.mark.parametrize("url, error", [
    ("redis+sentinel://s1,s2", "needs the master's name"),
    ("redis+sentinel://s1/herald/zero", r"expected /master-name\[/db\]"),
    ("redis+cluster://r1/2", "a Cluster has database 0 only"),
    ("redis+cluster://r1:99999", "expected host:port addresses"),
    ("redis+cluster://r1,,r2", "expected host:port addresses"),
    ("redis+sentinel://s1/herald?sentinel_pasword=x", "unknown option 'sentinel_pasword'"),
    ("redis+cluster://r1?sentinel_password=x", "unknown option 'sentinel_password'"),
    ("rediss+cluster://r1?ssl_ca_certs=/no/such.pem", "ssl_ca_certs: no such file"),
    ("redis://cache:port/0", "expected a port number"),
    ("redis+cluster://r1?ssl_cert_reqs=none", "ssl_cert_reqs is a TLS option: use rediss://"),
    ("redis+sentinels://s1/herald", "expected sqlite:///path, redis://"),
])
def test_bad_urls_stop_startup_naming_the_variable_and_not_the_password(url, error):
    with pytest.raises(ConfigError, match=f"^IDEMPOTENCY_STORE: .*{error}") as e:
        load_config({"IDEMPOTENCY_STORE": url.replace("//", "//:hunter2@", 1)})
    assert "hunter2" not in str(e.value)


def test_a_password_never_shows_in_the_config_repr(tmp_path):
    secret_file = tmp_path / "store-url"
    secret_file.write_text("redis+sentinel://:hunter2@s1,s2/herald?sentinel_password=sentinel-secret\n")
    cfg = load_config({"IDEMPOTENCY_STORE_FILE": str(secret_file)})
    assert cfg.idempotency_store.startswith("redis+sentinel://:hunter2@")  # from the file, trimmed
    assert "hunter2" not in repr(cfg) and "sentinel-secret" not in repr(cfg)
    assert redacted("redis://u:pw@h:1/0") == "redis://u:***@h:1/0"
