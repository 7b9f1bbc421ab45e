"""The embeddable runner builds connection strings libpq accepts, whatever the values."""

import psycopg

from pgotel_proxy.background import _conninfo_value


def test_conninfo_values_are_quoted_when_needed():
    assert _conninfo_value("plain") == "plain"
    assert _conninfo_value("a b") == "'a b'"
    assert _conninfo_value("it's") == r"'it\'s'"
    assert _conninfo_value("") == "''"


def test_dsn_with_awkward_values_reaches_the_server(proxy):
    with psycopg.connect(proxy.dsn(application_name="it's a test")) as conn:
        assert conn.execute("show application_name").fetchone() == ("it's a test",)
