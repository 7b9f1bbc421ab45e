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


def test_wait_samples_of_a_statement_start_at_the_threshold():
    """Samples are taken of every active backend of an open connection; a statement gets those
    taken from ``wait_event_threshold`` after its start to its end, so short statements get none."""
    cfg = load_config(None, env={}, overrides={"stats_dsn": "host=127.0.0.1 user=x", "wait_event_threshold": 0.3})
    enricher = Enricher(cfg, backends=lambda: [7])
    ms = 1_000_000
    for t in (100, 250, 350, 500, 900):
        enricher._waits.add(7, t * ms, "Timeout", "PgSleep", None)
    assert enricher.backends() == [7]
    assert [s[0] // ms for s in enricher.wait_samples(7, 0, 600 * ms)] == [350, 500]
    assert enricher.wait_samples(7, 400 * ms, 650 * ms) == []  # ran 250 ms: below the threshold
    assert enricher.wait_samples(8, 0, 600 * ms) == []
