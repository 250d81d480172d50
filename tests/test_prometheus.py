"""deploy/prometheus/: the rules pass promtool (check, and the unit tests in tests/prometheus/), and
a real Prometheus scraping a real herald-smtp whose primary relay is down fires the relay alert
within its `for:`; every query of the Grafana dashboard returns data from that Prometheus."""

import datetime
import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from conftest import ROOT, free_port, wait_for

PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
pytestmark = pytest.mark.skipif(not (PROMETHEUS and PROMTOOL),
                                reason="needs Debian's prometheus package (.ci/run installs it)")
RULES = os.path.join(ROOT, "deploy", "prometheus", "herald-smtp.rules.yml")
DASHBOARD = os.path.join(ROOT, "deploy", "prometheus", "herald-smtp.dashboard.json")
# The test copy of the rules waits FOR instead of the shipped `for:` (minutes): the expressions
# are the shipped ones, byte for byte, and the shipped `for:` are held in simulated time by
# tests/prometheus/rules_test.yml. Prometheus scrapes and evaluates every second.
FOR, INTERVAL = 3, 1


def test_promtool_checks_the_rules_and_runs_their_unit_tests():
    for args in (["check", "rules", RULES], ["test", "rules", os.path.join(ROOT, "tests", "prometheus", "rules_test.yml")]):
        run = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "SUCCESS" in run.stdout


class Prometheus:
    def __init__(self, tmp_path, target_port):
        rules = yaml.safe_load(open(RULES))
        for group in rules["groups"]:
            for rule in group["rules"]:
                if "for" in rule:
                    rule["for"] = f"{FOR}s"
        (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": f"{INTERVAL}s", "evaluation_interval": f"{INTERVAL}s"},
            "rule_files": [str(tmp_path / "rules.yml")],
            "scrape_configs": [{"job_name": "herald-smtp", "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}],
        }))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(tmp_path / "prometheus.log", "w")
        self.proc = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                                      f"--storage.tsdb.path={tmp_path / 'data'}",
                                      f"--web.listen-address={self.url[len('http://'):]}"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: self._ready(), timeout=30)

    def _ready(self):
        assert self.proc.poll() is None, "prometheus exited"
        try:
            return urllib.request.urlopen(self.url + "/-/ready", timeout=1).status == 200
        except OSError:
            return False

    def api(self, path, **params):
        url = f"{self.url}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
        body = json.loads(urllib.request.urlopen(url, timeout=10).read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr):
        return self.api("query", query=expr)["result"]

    def alerts(self, state):
        return {a["labels"]["alertname"]: a for a in self.api("alerts")["alerts"] if a["state"] == state}

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=20)
        self.log.close()


def _unix(rfc3339):
    """Prometheus's timestamps (2026-12-06T06:30:01.123456789Z) as Unix time."""
    whole, _, fraction = rfc3339.rstrip("Z").partition(".")
    return datetime.datetime.fromisoformat(whole).replace(tzinfo=datetime.timezone.utc).timestamp() + float("0." + (fraction or "0"))


@pytest.fixture
def prometheus(tmp_path):
    started = []
    yield lambda port: started.append(Prometheus(tmp_path, port)) or started[-1]
    for p in started:
        p.stop()


def test_a_real_prometheus_fires_the_relay_alert_and_fills_the_dashboard(gunicorn, smtp_server, prometheus):
    fallback = {f"SMTP_FALLBACK_1_{k[len('SMTP_'):]}": v for k, v in smtp_server.env().items() if k != "SMTP_FROM"}
    primary = {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(free_port()), "SMTP_USE_STARTTLS": "false",
               "SMTP_FROM": "noreply@example.com"}  # nothing listens there: connection refused
    g = gunicorn({**primary, **fallback}, workers=2, threads=2)
    prom = prometheus(g.port)
    wait_for(lambda: [r["value"][1] for r in prom.query('up{job="herald-smtp"}')] == ["1"], timeout=20)
    time.sleep(INTERVAL)  # a scrape of the counters before the sends, so rate() sees them rise

    assert g.post({"to": "user@example.com", "body": "Your code is 424242"})[0] == 200  # through the fallback
    failed_at = time.time()  # the primary failed during that send
    for _ in range(3):
        assert g.post({"to": "user@example.com", "body": "Your code is 424242"})[0] == 200
    assert g.post({"to": "not an address"})[0] == 400  # a failure, for the failure panels
    assert len(smtp_server.messages) == 4

    wait_for(lambda: "HeraldSmtpPrimaryRelayDown" in prom.alerts("firing"), timeout=FOR + 2 * INTERVAL + 15)
    fired_after = time.time() - failed_at
    alert = prom.alerts("firing")["HeraldSmtpPrimaryRelayDown"]
    assert alert["labels"]["instance"] == f"127.0.0.1:{g.port}" and alert["labels"]["severity"] == "warning"
    # Pending from the first scrape and evaluation after the failure (Prometheus's own clock: a busy
    # machine may add a second), firing once for: has passed since.
    pending_after = _unix(alert["activeAt"]) - failed_at
    assert 0 <= pending_after <= 2 * INTERVAL + 2, pending_after
    assert FOR <= fired_after <= FOR + 2 * INTERVAL + 5, fired_after
    # The fallback carries the mail: not every relay is down.
    assert "HeraldSmtpAllRelaysDown" not in {**prom.alerts("pending"), **prom.alerts("firing")}

    dashboard = json.load(open(DASHBOARD))
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(queries) >= 15
    empty = [q for q in queries if not prom.query(q)]
    assert empty == [], empty
