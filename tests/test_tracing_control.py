"""The admin endpoint against a running proxy: health, readiness, metrics, status, runtime tracing control.

Requests go over real HTTP (urllib) to the proxy's aiohttp listener; the
effects are checked where they matter: spans arriving (or not) at the OTLP
receiver, Prometheus text parsed with prometheus_client's own parser.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tracetree import comment, random_traceparent, server_spans

pytestmark = pytest.mark.timeout(60)

TOKEN = "t0ken-for-admin"


def http(method: str, url: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def status(proxy) -> dict:
    code, body = http("GET", proxy.admin_url + "/status")
    assert code == 200
    return json.loads(body)


def post_tracing(proxy, body: dict, token: str | None = None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    code, text = http("POST", proxy.admin_url + "/tracing", body, headers)
    return code, json.loads(text)


def metrics(proxy) -> dict[str, float]:
    code, text = http("GET", proxy.admin_url + "/metrics")
    assert code == 200
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = sample.value
    return out


def run_marked(proxy, otlp, conn, n_plain: int = 3) -> tuple[str, int]:
    """``n_plain`` root statements, then a traced marker; waits for the marker.

    Returns the marker's trace id and how many root SELECTs arrived with it.
    """
    for _ in range(n_plain):
        conn.execute("SELECT 'plain'")
    ctx = random_traceparent()
    conn.execute(comment("SELECT 'marker'", ctx))
    proxy.flush()
    otlp.wait_for(lambda s: server_spans(s, ctx.trace_id))
    return ctx.trace_id, len([s for s in server_spans(otlp.spans) if s.parent_span_id is None])


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------
# health, readiness, metrics, status


def test_healthz_and_readyz(make_proxy):
    proxy = make_proxy()
    assert http("GET", proxy.admin_url + "/healthz") == (200, "ok\n")
    code, body = http("GET", proxy.admin_url + "/readyz")
    assert (code, body) == (200, "ready\n")


def test_readyz_503_when_upstream_is_down(make_proxy):
    port = unused_port()
    proxy = make_proxy(upstream=f"127.0.0.1:{port}")
    code, body = http("GET", proxy.admin_url + "/readyz")
    assert code == 503
    assert f"127.0.0.1:{port}" in body
    # Alive all the same.
    assert http("GET", proxy.admin_url + "/healthz")[0] == 200


def test_metrics_parse_and_move(make_proxy, otlp):
    proxy = make_proxy()
    before = metrics(proxy)
    for name in ("pgotel_statements_total", "pgotel_spans_exported_total", "pgotel_connections_accepted_total",
                 "pgotel_connections_active", "pgotel_span_queue_size", "pgotel_spans_dropped_total"):
        assert name in before, sorted(before)
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=None) as conn:
        for _ in range(10):
            conn.execute("SELECT 1")
        during = metrics(proxy)
        assert during["pgotel_connections_active"] >= 1
        run_marked(proxy, otlp, conn, 0)
    after = metrics(proxy)
    assert after["pgotel_statements_total"] - before["pgotel_statements_total"] >= 11
    assert after["pgotel_spans_exported_total"] - before["pgotel_spans_exported_total"] >= 22
    assert after["pgotel_connections_accepted_total"] - before["pgotel_connections_accepted_total"] >= 1
    code, _ = http("GET", proxy.admin_url + "/metrics")
    with urllib.request.urlopen(proxy.admin_url + "/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")


def test_status_json(make_proxy, pg):
    proxy = make_proxy(sample_rate=0.25)
    st = status(proxy)
    assert st["tracing"] is True
    assert st["sample_rate"] == 0.25
    assert st["upstream"] == f"{pg.host}:{pg.port}"
    assert isinstance(st["version"], str) and st["version"]
    for key in ("queue_size", "spans_dropped", "connections_active"):
        assert isinstance(st[key], int)


# --------------------------------------------------------------------------
# runtime control


def test_disable_and_enable_tracing(make_proxy, otlp):
    proxy = make_proxy()
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=None) as conn:
        run_marked(proxy, otlp, conn)
        code, st = post_tracing(proxy, {"enabled": False})
        assert code == 200 and st["tracing"] is False
        assert status(proxy)["tracing"] is False
        ctx = random_traceparent()
        for _ in range(5):
            conn.execute(comment("SELECT 'while off'", ctx))
        conn.execute("SELECT 'while off'")
        proxy.flush()
        time.sleep(0.3)
        assert not server_spans(otlp.spans, ctx.trace_id)
        seen = len(otlp.spans)

        code, st = post_tracing(proxy, {"enabled": True})
        assert code == 200 and st["tracing"] is True
        trace_id, _ = run_marked(proxy, otlp, conn)
        assert len(otlp.spans) > seen
    texts = [s.attributes.get("db.query.text") for s in server_spans(otlp.spans)]
    assert "SELECT ?" in texts and texts.count("SELECT ?") == 8, otlp.dump()  # 2 x (3 plain + marker); nothing while off


def test_change_sample_rate(make_proxy, otlp):
    proxy = make_proxy()
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=None) as conn:
        _, roots = run_marked(proxy, otlp, conn, 3)
        assert roots == 3
        code, st = post_tracing(proxy, {"sample_rate": 0})
        assert code == 200 and st["sample_rate"] == 0.0
        assert proxy.tracer.sample_rate == 0.0
        otlp.clear()
        trace_id, roots = run_marked(proxy, otlp, conn, 20)
        # Root statements are no longer sampled; the one with a sampled context still is.
        assert roots == 0
        assert {s.trace_id for s in server_spans(otlp.spans)} == {trace_id}
        code, st = post_tracing(proxy, {"sample_rate": 1.0})
        assert code == 200
        otlp.clear()
        _, roots = run_marked(proxy, otlp, conn, 4)
        assert roots == 4


@pytest.mark.parametrize("body", [{"sample_rate": 1.5}, {"sample_rate": -0.1}, {"sample_rate": "lots"}])
def test_invalid_requests_change_nothing(make_proxy, body):
    proxy = make_proxy(sample_rate=0.5)
    code, answer = post_tracing(proxy, body)
    assert code == 400 and "error" in answer
    st = status(proxy)
    assert st["sample_rate"] == 0.5 and st["tracing"] is True


def test_invalid_json_is_400(make_proxy):
    proxy = make_proxy()
    req = urllib.request.Request(proxy.admin_url + "/tracing", data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 400
    assert status(proxy)["tracing"] is True


def test_half_valid_request_changes_nothing(make_proxy):
    """A request with one good and one bad value is refused as a whole."""
    proxy = make_proxy(sample_rate=0.5)
    code, _ = post_tracing(proxy, {"enabled": False, "sample_rate": 7})
    assert code == 400
    st = status(proxy)
    assert st["tracing"] is True and st["sample_rate"] == 0.5
    code, _ = post_tracing(proxy, {"sample_rate": 0.1, "enabled": "maybe"})
    assert code == 400
    st = status(proxy)
    assert st["tracing"] is True and st["sample_rate"] == 0.5


def test_admin_token(make_proxy):
    proxy = make_proxy(admin_token=TOKEN)
    for token in (None, "wrong", TOKEN + "x", ""):
        code, answer = post_tracing(proxy, {"enabled": False, "sample_rate": 0.0}, token)
        assert code == 401, token
        st = status(proxy)
        assert st["tracing"] is True and st["sample_rate"] == 1.0
    # A token in another scheme is not accepted either.
    code, _ = http("POST", proxy.admin_url + "/tracing", {"enabled": False}, {"Authorization": TOKEN})
    assert code == 401
    code, answer = post_tracing(proxy, {"enabled": False, "sample_rate": 0.0}, TOKEN)
    assert code == 200 and answer["tracing"] is False and answer["sample_rate"] == 0.0
    # Read-only endpoints stay open (probes and scrapers carry no token).
    assert http("GET", proxy.admin_url + "/healthz")[0] == 200
    assert http("GET", proxy.admin_url + "/metrics")[0] == 200


def test_reenabled_tracing_forgets_carrier_changed_while_off(make_proxy, otlp):
    """A RESET of the session carrier while tracing was off must not leave the old context in force."""
    proxy = make_proxy()
    carrier = random_traceparent()
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=None) as conn:
        conn.execute(f"SET pgotel.traceparent = '{carrier.traceparent}'")
        conn.execute("SELECT 'under carrier'")
        proxy.flush()
        otlp.wait_for(lambda s: len(server_spans(s, carrier.trace_id)) >= 2)
        assert post_tracing(proxy, {"enabled": False})[0] == 200
        conn.execute("RESET pgotel.traceparent")
        assert post_tracing(proxy, {"enabled": True})[0] == 200
        conn.execute("SELECT 'after reset'")
        run_marked(proxy, otlp, conn, 0)
    assert len(server_spans(otlp.spans, carrier.trace_id)) == 2, otlp.tree(carrier.trace_id)


@pytest.mark.parametrize("body", [{"enabled": "false"}, {"enabled": 0}, {"sample_rate": True}, {"sampling": 0.5}, [1, 2]])
def test_wrongly_typed_values_are_refused(make_proxy, body):
    # Only JSON booleans switch tracing (bool(0) would turn it off, bool("false") on).
    proxy = make_proxy(sample_rate=0.5)
    code, _ = http("POST", proxy.admin_url + "/tracing", body)
    assert code == 400
    st = status(proxy)
    assert st["tracing"] is True and st["sample_rate"] == 0.5


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing address
        except OSError:
            return None
        addr = s.getsockname()[0]
    return None if addr.startswith("127.") or addr == "0.0.0.0" else addr


def test_without_token_only_loopback_may_change_state(make_proxy):
    addr = _non_loopback_address()
    if addr is None:
        pytest.skip("no non-loopback IPv4 address on this host")
    proxy = make_proxy(admin_listen="0.0.0.0:0")
    remote_url = f"http://{addr}:{proxy.admin.port}"
    code, _ = http("POST", remote_url + "/tracing", {"enabled": False})
    assert code == 401
    assert status(proxy)["tracing"] is True
    assert http("GET", remote_url + "/healthz")[0] == 200
    assert post_tracing(proxy, {"enabled": False})[0] == 200  # from loopback
