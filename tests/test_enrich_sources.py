"""Each server-side source can be switched off on its own (``enrich_sources``)."""

from pgotel_proxy.config import load_config
from pgotel_proxy.enrich.enricher import Enricher


def _status(**overrides):
    cfg = load_config(None, env={}, overrides={"stats_dsn": "host=127.0.0.1 user=x", "server_log": None, **overrides})
    return Enricher(cfg).status


def test_all_sources_start_by_default_when_configured():
    st = _status()
    assert st["pg_stat_statements"] == "starting" and st["wait_events"] == "starting"
    assert st["auto_explain"] == "off"  # no server_log configured


def test_sources_left_out_are_off():
    st = _status(enrich_sources=["wait_events"])
    assert st["pg_stat_statements"] == "off"
    assert st["wait_events"] == "starting"
    st = _status(enrich_sources=[], server_log_via_sql=True)
    assert set(st.values()) == {"off"}
