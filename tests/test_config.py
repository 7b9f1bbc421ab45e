"""Tests of the config model: defaults, env/file/override layering, validation, reference."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from pgotel_proxy.config import (
    GROUPS,
    OPTIONS,
    Config,
    ConfigError,
    dump_toml,
    env_name,
    field_description,
    field_group,
    flag_name,
    load_config,
    load_config_with_sources,
    option_value,
    reference_markdown,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "pgotel-proxy.toml"
FIELDS = list(OPTIONS)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.startswith(("PGOTEL_", "OTEL_")):
            monkeypatch.delenv(var)


def write(tmp_path: Path, text: str, name: str = "conf.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(**kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- defaults and shape ----------------------------------------------------------

def test_defaults_match_the_documented_values() -> None:
    config = load_config(env={})
    assert config == Config()
    assert config.listen == "127.0.0.1:6432"
    assert config.upstream == "127.0.0.1:5432"
    assert config.upstream_tls == "prefer"
    assert config.max_message_size == 256 * 1024 * 1024
    assert config.max_startup_packet == 10000
    assert config.tracing is True and config.sample_rate == 1.0
    assert config.capture_parameters is False and config.capture_query_literals is False
    assert config.admin_listen == "127.0.0.1:9187"
    assert config.server_log_line_prefix == "%m [%p] "
    assert config.wal_writing_functions == []
    assert config.listen_address == ("127.0.0.1", 6432)
    assert config.upstream_address == ("127.0.0.1", 5432)
    assert config.upstream_unix_path is None
    assert config.upstream_server_name == "127.0.0.1"
    assert config.admin_address == ("127.0.0.1", 9187)
    assert config.client_tls_enabled is False


def test_every_field_has_a_group_and_a_description() -> None:
    for name in FIELDS:
        assert field_group(name) in GROUPS, name
        description = field_description(name)
        assert description and description.endswith("."), name
    assert {field_group(n) for n in FIELDS} == set(GROUPS)


def test_config_is_frozen_and_rejects_unknown_fields() -> None:
    config = Config()
    with pytest.raises(ValidationError):
        config.listen = "0.0.0.0:1"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        Config(no_such_option=1)  # type: ignore[call-arg]


def test_names_are_derived_mechanically() -> None:
    assert env_name("upstream_tls") == "PGOTEL_UPSTREAM_TLS"
    assert env_name("sample_rate") == "PGOTEL_SAMPLE_RATE"
    assert flag_name("client_tls_cert") == "--client-tls-cert"


# -- benchmark switches ----------------------------------------------------------

def test_no_benchmark_switch_is_an_option() -> None:
    # The pump relays traced sessions and spans are built in the span process: no switch for either.
    assert not {"traced_pump", "span_process", "experimental"} & set(Config.model_fields)
    message = error_of(overrides={"experimental": {"traced_pump": False}}, env={})
    assert message.startswith("experimental: unknown option"), message


# -- environment -----------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("off", False), ("on", True), ("true", True), ("false", False), ("0", False),
    ("1", True), ("OFF", False),
])
def test_tracing_switch_from_env(text: str, expected: bool) -> None:
    assert load_config(env={"PGOTEL_TRACING": text}).tracing is expected


def test_env_values_are_converted_to_field_types() -> None:
    config = load_config(env={
        "PGOTEL_SAMPLE_RATE": "0.25",
        "PGOTEL_MAX_CONNECTIONS": "17",
        "PGOTEL_UPSTREAM_TLS": "disable",
        "PGOTEL_WAL_WRITING_FUNCTIONS": "app.f, app.g,,h ",
        "PGOTEL_ADMIN_TOKEN": "s3cret",
        "PGOTEL_LOG_LEVEL": "WARNING",
        "PGOTEL_SERVER_LOG": "~/pg.json",
        "UNRELATED": "x",
        "PGOTEL_NOT_AN_OPTION": "ignored",
    })
    assert config.sample_rate == 0.25
    assert config.max_connections == 17
    assert config.upstream_tls == "disable"
    assert config.wal_writing_functions == ["app.f", "app.g", "h"]
    assert isinstance(config.admin_token, SecretStr)
    assert config.admin_token.get_secret_value() == "s3cret"
    assert config.log_level == "warning"
    assert config.server_log == Path("~/pg.json").expanduser()


def test_empty_env_value_unsets_optional_settings() -> None:
    config = load_config(env={"PGOTEL_ADMIN_LISTEN": "", "PGOTEL_SERVICE_NAME": " "})
    assert config.admin_listen is None and config.admin_address is None
    assert config.service_name is None


def test_service_name_and_protocol_fall_back_to_otel_variables() -> None:
    config = Config()
    assert config.resolved_service_name({}) == "pgotel-proxy"
    assert config.resolved_service_name({"OTEL_SERVICE_NAME": "db"}) == "db"
    assert Config(service_name="mine").resolved_service_name({"OTEL_SERVICE_NAME": "db"}) == "mine"
    assert config.resolved_otlp_protocol({}) == "http/protobuf"
    assert config.resolved_otlp_protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) == "grpc"
    assert Config(otlp_protocol="grpc").resolved_otlp_protocol({}) == "grpc"


# -- precedence ------------------------------------------------------------------

def test_precedence_overrides_then_env_then_file_then_defaults(tmp_path: Path) -> None:
    file = write(tmp_path, """
listen = "0.0.0.0:7000"
upstream = "db.example:5433"
sample_rate = 0.1
log_level = "debug"
""")
    env = {"PGOTEL_UPSTREAM": "db2.example:5434", "PGOTEL_SAMPLE_RATE": "0.2"}
    config, sources = load_config_with_sources(file=file, env=env,
                                               overrides={"sample_rate": 0.3})
    assert config.listen == "0.0.0.0:7000"            # file
    assert config.upstream == "db2.example:5434"      # env beats file
    assert config.sample_rate == 0.3                  # override beats env
    assert config.log_level == "debug"                # file
    assert config.exporter == "otlp"                  # default
    assert sources["listen"] == str(file)
    assert sources["upstream"] == "PGOTEL_UPSTREAM"
    assert sources["sample_rate"] == "override sample_rate"
    assert "exporter" not in sources


def test_config_file_can_come_from_pgotel_config(tmp_path: Path) -> None:
    file = write(tmp_path, 'workers = 3\n')
    other = write(tmp_path, 'workers = 5\n', "other.toml")
    assert load_config(env={"PGOTEL_CONFIG": str(file)}).workers == 3
    assert load_config(file=other, env={"PGOTEL_CONFIG": str(file)}).workers == 5


# -- file errors -----------------------------------------------------------------

def test_unknown_key_in_file_is_named_with_a_suggestion(tmp_path: Path) -> None:
    file = write(tmp_path, 'sample_rat = 0.5\n')
    message = error_of(file=file, env={})
    assert message.startswith("sample_rat: unknown option in ")
    assert "did you mean 'sample_rate'?" in message


def test_nested_table_is_an_unknown_key(tmp_path: Path) -> None:
    file = write(tmp_path, '[tls]\nca = "x"\n')
    assert error_of(file=file, env={}).startswith("tls: unknown option")


def test_bad_toml(tmp_path: Path) -> None:
    file = write(tmp_path, 'listen = \n')
    message = error_of(file=file, env={})
    assert message.startswith("config: ") and "invalid TOML" in message and "line 1" in message


def test_unreadable_file(tmp_path: Path) -> None:
    message = error_of(file=tmp_path / "missing.toml", env={})
    assert message.startswith("config: cannot read ") and "missing.toml" in message


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'service_name = "caf\xe9"\n')
    assert "not UTF-8" in error_of(file=path, env={})


# -- value validation ------------------------------------------------------------

@pytest.mark.parametrize("env,field,fragment", [
    ({"PGOTEL_SAMPLE_RATE": "1.5"}, "sample_rate", "less than or equal to 1"),
    ({"PGOTEL_SAMPLE_RATE": "nan"}, "sample_rate", "finite"),
    ({"PGOTEL_LISTEN": "6432"}, "listen", "not host:port"),
    ({"PGOTEL_LISTEN": "::1:6432"}, "listen", "brackets"),
    ({"PGOTEL_LISTEN": "[::1]"}, "listen", ":port"),
    ({"PGOTEL_LISTEN": "localhost:99999"}, "listen", "out of range"),
    ({"PGOTEL_UPSTREAM": "db:0"}, "upstream", "port 0"),
    ({"PGOTEL_UPSTREAM": "relative/socket"}, "upstream", "absolute"),
    ({"PGOTEL_UPSTREAM_TLS": "yes"}, "upstream_tls", "'verify-full'"),
    ({"PGOTEL_MAX_CONNECTIONS": "0"}, "max_connections", "greater than or equal to 1"),
    ({"PGOTEL_MAX_CONNECTIONS": "many"}, "max_connections", "valid integer"),
    ({"PGOTEL_CONNECT_TIMEOUT": "0"}, "connect_timeout", "greater than 0"),
    ({"PGOTEL_OTLP_ENDPOINT": "collector:4317"}, "otlp_endpoint", "http://"),
    ({"PGOTEL_EXPORT_BATCH_SIZE": "40000"}, "export_batch_size", "span_queue_size"),
    ({"PGOTEL_SERVER_LOG_VIA_SQL": "on"}, "stats_dsn", "server_log_via_sql"),
    ({"PGOTEL_WAL_MESSAGE_PREFIX": ""}, "wal_message_prefix", ""),
    ({"PGOTEL_UNIX_SOCKET": "/" + "s" * 120}, "unix_socket", "limited to 107"),
    ({"PGOTEL_UPSTREAM": "/tmp/.s.PGSQL.5432", "PGOTEL_UPSTREAM_TLS": "verify-full"},
     "upstream_tls", "Unix socket"),
    ({"PGOTEL_UPSTREAM_TLS": "disable", "PGOTEL_UPSTREAM_TLS_SERVER_NAME": "db"},
     "upstream_tls_server_name", "'disable'"),
    ({"PGOTEL_CLIENT_TLS_CERT": "/nonexistent/cert.pem"}, "client_tls_cert", "no such file"),
])
def test_bad_values_name_the_field(env: dict[str, str], field: str, fragment: str) -> None:
    message = error_of(env=env)
    assert message.startswith(f"{field}: "), message
    assert fragment in message


def test_error_says_where_the_value_came_from(tmp_path: Path) -> None:
    assert "(got '2' from PGOTEL_SAMPLE_RATE)" in error_of(env={"PGOTEL_SAMPLE_RATE": "2"})
    file = write(tmp_path, "sample_rate = 2\n")
    assert f"from {file}" in error_of(file=file, env={})


def test_upstream_socket_directory_is_refused_with_a_hint(tmp_path: Path) -> None:
    message = error_of(env={"PGOTEL_UPSTREAM": str(tmp_path)})
    assert message.startswith("upstream: ") and ".s.PGSQL.5432" in message


def test_upstream_unix_socket_file(tmp_path: Path) -> None:
    config = load_config(env={"PGOTEL_UPSTREAM": "/run/postgresql/.s.PGSQL.5432"})
    assert config.upstream_unix_path == "/run/postgresql/.s.PGSQL.5432"
    assert config.upstream_address is None and config.upstream_server_name is None


def test_tls_files_must_come_in_pairs_and_exist(tmp_path: Path) -> None:
    cert = write(tmp_path, "cert", "c.pem")
    key = write(tmp_path, "key", "k.pem")
    assert error_of(env={"PGOTEL_CLIENT_TLS_CERT": str(cert)}).startswith(
        "client_tls_key: required when client_tls_cert is set")
    assert error_of(env={"PGOTEL_UPSTREAM_TLS_KEY": str(key)}).startswith(
        "upstream_tls_cert: required when upstream_tls_key is set")
    assert error_of(env={"PGOTEL_CLIENT_TLS_CERT": str(tmp_path),
                         "PGOTEL_CLIENT_TLS_KEY": str(key)}).startswith(
        "client_tls_cert: not a regular file")
    config = load_config(env={"PGOTEL_CLIENT_TLS_CERT": str(cert),
                              "PGOTEL_CLIENT_TLS_KEY": str(key)})
    assert config.client_tls_enabled and config.client_tls_cert == cert


def test_verify_modes_without_a_ca_use_the_system_store() -> None:
    # A deliberate choice: verify-* without upstream_tls_ca is valid.
    config = load_config(env={"PGOTEL_UPSTREAM_TLS": "verify-full",
                              "PGOTEL_UPSTREAM": "db.example:5432"})
    assert config.upstream_tls_ca is None
    assert config.upstream_server_name == "db.example"


def test_secrets_never_appear_in_errors_or_dumps(tmp_path: Path) -> None:
    file = write(tmp_path, "admin_token = 8675309\n")
    message = error_of(file=file, env={})
    assert message.startswith("admin_token: ") and "8675309" not in message
    config = load_config(env={"PGOTEL_ADMIN_TOKEN": "hunter2", "PGOTEL_STATS_DSN": "password=x9"})
    text = dump_toml(config) + repr(config) + str(config)
    assert "hunter2" not in text and "x9" not in text


def test_multiple_problems_still_give_one_line() -> None:
    message = error_of(env={"PGOTEL_SAMPLE_RATE": "3", "PGOTEL_WORKERS": "0"})
    assert message.endswith("(+1 more)")


def test_unknown_override_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^listn: unknown option \(did you mean 'listen'\?\)"):
        load_config(env={}, overrides={"listn": "x"})


# -- rendering -------------------------------------------------------------------

def test_dump_toml_round_trips(tmp_path: Path) -> None:
    config = load_config(env={"PGOTEL_WAL_WRITING_FUNCTIONS": 'a,b"c',
                              "PGOTEL_SERVER_LOG_LINE_PREFIX": "%t\t[%p] ",
                              "PGOTEL_ADMIN_LISTEN": "", "PGOTEL_SAMPLE_RATE": "0.125"})
    text = dump_toml(config)
    assert 'admin_listen = ""  # unset' in text
    assert "# unix_socket is unset" in text
    assert load_config(file=write(tmp_path, text), env={}) == config


def test_reference_mentions_every_field_flag_and_env_var() -> None:
    text = reference_markdown()
    for group in GROUPS:
        assert f"## {group}\n" in text
    for name in FIELDS:
        assert f"| `{name}` |" in text, name
        assert f"`{env_name(name)}`" in text, name
        assert flag_name(name) in text, name
    assert "`--tracing` / `--no-tracing`" in text
    # Every table row has the five columns (pipes inside cells are escaped).
    for line in text.splitlines():
        if line.startswith("| `"):
            assert len(re.findall(r"(?<!\\)\|", line)) == 6, line


# -- the example file ------------------------------------------------------------

def _example_entries() -> dict[str, list[str]]:
    """Option name -> the values shown for it."""
    entries: dict[str, list[str]] = {}
    for line in EXAMPLE.read_text().splitlines():
        match = re.match(r"^#?([a-z_]+) = (.+)$", line)
        if match:
            entries.setdefault(match.group(1), []).append(match.group(2))
    return entries


def test_example_file_loads_and_its_active_lines_are_the_defaults() -> None:
    assert load_config(file=EXAMPLE, env={}) == Config()


def test_example_file_covers_every_field_once_with_the_real_default() -> None:
    entries = _example_entries()
    assert sorted(entries) == sorted(FIELDS)
    for name, values in entries.items():
        assert len(values) == 1, name
        default = option_value(Config(), name)
        if default is None or default == []:
            continue  # the file shows an example value instead
        shown = tomllib.loads(f"v = {values[0]}")["v"]
        assert shown == default, name


def test_default_export_batch_gives_way_to_a_smaller_span_queue(tmp_path: Path) -> None:
    """Without export_batch_size, a span queue below the default batch sets it; set both, they must agree."""
    assert Config().export_batch_size == 8192
    assert Config(span_queue_size=300).export_batch_size == 300
    assert Config(span_queue_size=50_000).export_batch_size == 8192
    path = tmp_path / "p.toml"
    path.write_text("span_queue_size = 100\n")
    assert load_config(path, env={}).export_batch_size == 100
    assert load_config(None, env={"PGOTEL_SPAN_QUEUE_SIZE": "64"}).export_batch_size == 64
    with pytest.raises((ConfigError, ValidationError), match="export_batch_size"):
        Config(span_queue_size=100, export_batch_size=200)
