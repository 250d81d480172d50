"""openapi.yaml stays true to the code, and requests generated from it (schemathesis) never get a
5xx, always get the envelope when refused, and send nothing when refused."""

import json
import os

import jsonschema_rs
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_headers_conformance,
                                               response_schema_conformance, status_code_conformance)

from conftest import CONTRACT_STATUS, ROOT, send_json, unique_key
from herald_smtp.http import api

SPEC_PATH = os.path.join(ROOT, "openapi.yaml")
with open(SPEC_PATH) as f:
    SPEC = yaml.safe_load(f)
SCHEMA = schemathesis.openapi.from_path(SPEC_PATH)  # refuses a file that is not valid OpenAPI
KEY = "openapi-test-key"
ERROR = jsonschema_rs.validator_for(SPEC["components"]["schemas"]["Error"])


def test_every_error_code_is_in_the_spec_and_only_those():
    assert set(SPEC["components"]["schemas"]["Error"]["properties"]["error_code"]["enum"]) == set(CONTRACT_STATUS)


def test_send_declares_the_status_of_every_failure_it_can_answer():
    route_only = {"not_found", "method_not_allowed"}  # the framework's, for paths and methods not in the spec
    expected = {200, 413, 415} | {status for code, status in CONTRACT_STATUS.items() if code not in route_only}
    assert {int(s) for s in SPEC["paths"]["/v1/send"]["post"]["responses"]} == expected


def test_request_properties_are_the_fields_the_api_reads():
    properties = SPEC["components"]["schemas"]["SendRequest"]["properties"]
    assert set(properties) == set(api._STRING_FIELDS) | {"params", "timeout_seconds"}
    assert properties["idempotency_key"]["maxLength"] == api.MAX_KEY_BYTES


def test_every_route_is_described(make_app, smtp_server):
    app = make_app(smtp_server.env())
    routes = {(r.rule, m.lower()) for r in app.url_map.iter_rules() if r.endpoint != "static"
              for m in r.methods - {"HEAD", "OPTIONS"}}
    assert routes == {(path, method) for path, item in SPEC["paths"].items() for method in item}


# -- real answers validate against the spec ---------------------------------------------

def _send(payload, key=None, api_key=KEY, **headers):
    return lambda client: send_json(client, payload, key=key, **({"X-API-Key": api_key} if api_key else {}),
                                    **headers)


def _conflict(client):
    key = unique_key()
    _send({"to": "a@example.com", "body": "1"}, key)(client)
    return _send({"to": "a@example.com", "body": "2"}, key)(client)


# label: operation, environment extras, Handler knobs, request, the status it gets
ANSWERS = {
    "sent": ("POST /v1/send", {}, {}, _send({"to": "a@example.com"}, unique_key(), **{"X-Request-ID": "r-1"}), 200),
    "unauthorized": ("POST /v1/send", {}, {}, _send({"to": "a@example.com"}, api_key="wrong"), 401),
    "invalid_request": ("POST /v1/send", {}, {}, lambda c: c.post("/v1/send", data="{", content_type="application/json",
                                                                   headers={"X-API-Key": KEY}), 400),
    "invalid_destination": ("POST /v1/send", {}, {}, _send({"to": "a@example.com, b@example.com"}), 400),
    "validation_failed": ("POST /v1/send", {}, {}, _send({"to": "a@example.com", "subject": "a\nb"}), 400),
    "conflict": ("POST /v1/send", {}, {}, _conflict, 409),
    "too_large": ("POST /v1/send", {"HTTP_BODY_LIMIT_BYTES": "100"}, {},
                  _send({"to": "a@example.com", "body": "x" * 200}), 413),
    "not_json": ("POST /v1/send", {}, {}, lambda c: c.post("/v1/send", data="to=a", content_type="text/plain",
                                                            headers={"X-API-Key": KEY}), 415),
    "send_failed": ("POST /v1/send", {}, {"data_reply": "554 5.6.0 no"}, _send({"to": "a@example.com"}), 500),
    "provider_down": ("POST /v1/send", {"SMTP_HOST": ""}, {}, _send({"to": "a@example.com"}), 503),
    "timeout": ("POST /v1/send", {}, {"data_delay": 2}, _send({"to": "a@example.com", "timeout_seconds": 1}), 504),
    "healthz": ("GET /healthz", {}, {}, lambda c: c.get("/healthz"), 200),
    "ready": ("GET /readyz", {}, {}, lambda c: c.get("/readyz"), 200),
    "not_ready": ("GET /readyz", {"SMTP_HOST": ""}, {}, lambda c: c.get("/readyz"), 503),
    "metrics": ("GET /metrics", {}, {}, lambda c: c.get("/metrics"), 200),
    "metrics_unauthorized": ("GET /metrics", {"METRICS_REQUIRE_API_KEY": "true"}, {}, lambda c: c.get("/metrics"), 401),
}


@pytest.mark.parametrize("label", ANSWERS)
def test_real_answers_match_the_spec(make_app, smtp_server, label):
    operation, env, knobs, request, status = ANSWERS[label]
    for name, value in knobs.items():
        setattr(smtp_server.handler, name, value)
    client = make_app(smtp_server.env(API_KEY=KEY, **env)).test_client()
    r = request(client)
    assert r.status_code == status
    method, path = operation.split()
    operation = SCHEMA[path][method]
    assert str(status) in operation.definition.raw["responses"]
    operation.validate_response(r)  # raises with the mismatch


@pytest.mark.parametrize("method, path, status", [("GET", "/v1/send", 405), ("POST", "/nope", 404),
                                                  ("DELETE", "/healthz", 405)])
def test_framework_errors_are_the_envelope_too(client, method, path, status):
    r = client.open(path, method=method)
    assert r.status_code == status
    ERROR.validate(r.json)


# -- generated requests (schemathesis), bounded for CI -------------------------------------

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


@pytest.fixture
def generated_app(make_app, smtp_server):
    return make_app(smtp_server.env(API_KEY=KEY))


# One test id per operation (SCHEMA.parametrize() gives them all one id, and pytest-xdist then
# runs only one of them).
@pytest.mark.parametrize("path, method", [(path, method.upper()) for path, ops in SPEC["paths"].items()
                                          for method in ops])
@settings(max_examples=50, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_generated_requests(path, method, data, generated_app, smtp_server):
    case = data.draw(SCHEMA[path][method].as_strategy())
    before = len(smtp_server.messages)
    r = case.call(app=generated_app, headers={"X-API-Key": KEY})
    case.validate_response(r, checks=CHECKS)
    sent = smtp_server.messages[before:]
    if r.status_code >= 400:
        ERROR.validate(json.loads(r.content))  # every failure, on every route and method, is the envelope
        assert sent == []  # nothing sent for a refused request
    elif (case.method, case.path) == ("POST", "/v1/send"):
        # One new mail to one recipient, or none when it replayed an earlier success for its key.
        keys = {(case.headers or {}).get("Idempotency-Key", "").strip(),
                (case.body if isinstance(case.body, dict) else {}).get("idempotency_key")}
        assert [len(m.rcpt_tos) for m in sent] == [1] or (sent == [] and json.loads(r.content)["message_id"] in keys)
    else:
        assert sent == []
