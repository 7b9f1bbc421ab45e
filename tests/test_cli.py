"""Tests of the ``pgotel-proxy`` command line: generated options, precedence, errors, output."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tomllib
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from pgotel_proxy import __version__
from pgotel_proxy.cli import main
from pgotel_proxy.config import GROUPS, OPTIONS, Config, env_name, flag_name, is_bool_field, load_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "pgotel-proxy.toml"
PREFIX = "pgotel-proxy: config error: "


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.startswith(("PGOTEL_", "OTEL_")):
            monkeypatch.delenv(var)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)


def invoke(args: list[str], env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, args, env=env, terminal_width=200)


def check(args: list[str], env: dict[str, str] | None = None) -> dict:
    result = invoke(["check-config", *args], env)
    assert result.exit_code == 0, result.stderr
    return tomllib.loads(result.stdout)


def test_version() -> None:
    result = invoke(["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"pgotel-proxy {__version__}"


@pytest.mark.parametrize("command", ["run", "check-config"])
def test_help_lists_every_option_with_its_env_var(command: str) -> None:
    result = invoke([command, "--help"])
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())  # undo line wrapping
    for name in OPTIONS:
        assert flag_name(name) in text, name
        assert f"env: {env_name(name)};" in text, name
        if is_bool_field(name):
            assert f"--no-{flag_name(name)[2:]}" in text, name
    assert "--config FILE" in text and "PGOTEL_CONFIG" in text
    for group in GROUPS:
        assert f"\n{group}:\n" in result.stdout, group
    assert "default: 127.0.0.1:6432" in text


def test_main_help_lists_commands() -> None:
    result = invoke(["--help"])
    assert result.exit_code == 0
    assert "run" in result.stdout and "check-config" in result.stdout


def test_check_config_prints_defaults_as_toml() -> None:
    shown = check([])
    assert shown["listen"] == "127.0.0.1:6432"
    assert shown["tracing"] is True
    assert shown["max_message_size"] == 256 * 1024 * 1024
    assert "unix_socket" not in shown


def test_flags_beat_env_beat_file_beat_defaults(tmp_path: Path) -> None:
    file = tmp_path / "p.toml"
    file.write_text('listen = "0.0.0.0:7001"\nupstream = "file-db:5432"\n'
                    'sample_rate = 0.1\ntracing = false\n')
    env = {"PGOTEL_UPSTREAM": "env-db:5432", "PGOTEL_SAMPLE_RATE": "0.2",
           "PGOTEL_TRACING": "off"}
    result = invoke(["check-config", "--config", str(file), "--sample-rate", "0.3",
                     "--tracing"], env)
    assert result.exit_code == 0, result.stderr
    shown = tomllib.loads(result.stdout)
    assert shown["listen"] == "0.0.0.0:7001"       # file
    assert shown["upstream"] == "env-db:5432"      # env over file
    assert shown["sample_rate"] == 0.3             # flag over env
    assert shown["tracing"] is True                # --tracing over PGOTEL_TRACING=off
    assert shown["exporter"] == "otlp"             # default
    # Each line says where a non-default value came from.
    lines = result.stdout.splitlines()
    assert f'listen = "0.0.0.0:7001"  # from {file}' in lines
    assert 'upstream = "env-db:5432"  # from PGOTEL_UPSTREAM' in lines
    assert "sample_rate = 0.3  # from --sample-rate" in lines


def test_config_file_from_env(tmp_path: Path) -> None:
    file = tmp_path / "p.toml"
    file.write_text("workers = 4\n")
    assert check([], {"PGOTEL_CONFIG": str(file)})["workers"] == 4


def test_bool_list_and_empty_flags() -> None:
    shown = check(["--no-tracing", "--wal-writing-functions", "app.a",
                   "--wal-writing-functions", "app.b,app.c", "--admin-listen", "",
                   "--log-level", "DEBUG"], {"PGOTEL_TRACING": "on"})
    assert shown["tracing"] is False
    assert shown["wal_writing_functions"] == ["app.a", "app.b", "app.c"]
    assert shown["admin_listen"] == ""
    assert shown["log_level"] == "debug"


def test_check_config_output_reloads_to_the_same_config(tmp_path: Path) -> None:
    args = ["--listen", "[::1]:0", "--upstream", "/run/postgresql/.s.PGSQL.5432",
            "--upstream-tls", "disable", "--server-log-line-prefix", "%t [%p]: ",
            "--capture-parameters", "--export-batch-size", "100"]
    result = invoke(["check-config", *args])
    assert result.exit_code == 0, result.stderr
    dumped = tmp_path / "dumped.toml"
    dumped.write_text(result.stdout)
    expected = load_config(env={}, overrides={
        "listen": "[::1]:0", "upstream": "/run/postgresql/.s.PGSQL.5432",
        "upstream_tls": "disable", "server_log_line_prefix": "%t [%p]: ",
        "capture_parameters": True, "export_batch_size": 100})
    assert load_config(file=dumped, env={}) == expected


def test_secrets_are_masked() -> None:
    result = invoke(["check-config", "--stats-dsn", "host=db password=opensesame"],
                    {"PGOTEL_ADMIN_TOKEN": "hunter2"})
    assert result.exit_code == 0, result.stderr
    assert "hunter2" not in result.output and "opensesame" not in result.output
    shown = tomllib.loads(result.stdout)
    assert shown["admin_token"] == "**********"
    assert shown["stats_dsn"] == "**********"


def test_example_config_is_accepted() -> None:
    result = invoke(["check-config", "--config", str(EXAMPLE)])
    assert result.exit_code == 0, result.stderr
    assert tomllib.loads(result.stdout)["upstream"] == "127.0.0.1:5432"


def _error_cases(tmp_path: Path) -> dict[str, tuple[list[str], dict[str, str], str]]:
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('listen = "127.0.0.1:6432"\nlisten_adress = "x"\n')
    broken = tmp_path / "broken.toml"
    broken.write_text('listen = "127.0.0.1:6432\n')
    bad_value = tmp_path / "bad.toml"
    bad_value.write_text('workers = "lots"\n')
    cert = tmp_path / "cert.pem"
    cert.write_text("not checked here")
    return {
        "bad flag": (["--sample-rate", "2"], {}, "sample_rate: "),
        "bad choice flag": (["--upstream-tls", "always"], {}, "upstream_tls: "),
        "bad env": ([], {"PGOTEL_LISTEN": "no-port"}, "listen: "),
        "bad bool env": ([], {"PGOTEL_TRACING": "maybe"}, "tracing: "),
        "unknown key": (["--config", str(unknown)], {}, "listen_adress: unknown option"),
        "bad toml": (["--config", str(broken)], {}, "config: "),
        "missing file": (["--config", str(tmp_path / "nope.toml")], {}, "config: cannot read"),
        "missing file from env": ([], {"PGOTEL_CONFIG": str(tmp_path / "nope.toml")},
                                  "config: cannot read"),
        "bad value in file": (["--config", str(bad_value)], {}, "workers: "),
        "cert without key": (["--client-tls-cert", str(cert)], {}, "client_tls_key: "),
    }


ERROR_CASES = ["bad flag", "bad choice flag", "bad env", "bad bool env", "unknown key",
               "bad toml", "missing file", "missing file from env", "bad value in file",
               "cert without key"]


@pytest.mark.parametrize("command", ["run", "check-config"])
@pytest.mark.parametrize("case", ERROR_CASES)
def test_config_errors_are_one_line_and_exit_2(command: str, case: str, tmp_path: Path) -> None:
    cases = _error_cases(tmp_path)
    assert sorted(cases) == sorted(ERROR_CASES)
    args, env, expected = cases[case]
    result = invoke([command, *args], env)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(PREFIX + expected), lines[0]
    assert "Traceback" not in result.stderr


def _subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGOTEL_", "OTEL_"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_real_process_config_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[[[\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pgotel_proxy", "check-config", "--config", str(broken)],
        cwd=ROOT, env=_subprocess_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX + f"config: {broken}: invalid TOML")


def test_real_process_check_config_with_example() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pgotel_proxy", "check-config", "--config", str(EXAMPLE),
         "--workers", "2"],
        cwd=ROOT, env=_subprocess_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert tomllib.loads(proc.stdout)["workers"] == 2


def test_run_hands_the_config_to_the_server_and_returns_its_exit_code(
        monkeypatch: pytest.MonkeyPatch, restore_logging: None) -> None:
    # A stand-in for pgotel_proxy.proxy.server checks the CLI's side of the
    # contract only: run(config) is called once and its result becomes the exit code.
    seen: list[Config] = []

    def fake_run(config: Config, reload=None) -> int:
        seen.append(config)
        logging.getLogger("pgotel_proxy.proxy.server").info(
            "listening on %s", config.listen, extra={"connections": 0})
        logging.getLogger("pgotel_proxy.proxy.server").debug("not shown at info")
        return 3

    stub = types.ModuleType("pgotel_proxy.proxy.server")
    stub.run = fake_run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pgotel_proxy.proxy.server", stub)

    result = invoke(["run", "--listen", "127.0.0.1:0", "--log-format", "json"],
                    {"PGOTEL_SAMPLE_RATE": "0.5"})
    assert result.exit_code == 3, result.stderr
    assert len(seen) == 1
    assert seen[0].listen == "127.0.0.1:0" and seen[0].sample_rate == 0.5
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert len(records) == 1
    assert records[0]["message"] == "listening on 127.0.0.1:0"
    assert records[0]["level"] == "info"
    assert records[0]["logger"] == "pgotel_proxy.proxy.server"
    assert records[0]["connections"] == 0


def test_run_text_logging_honours_level(monkeypatch: pytest.MonkeyPatch,
                                        restore_logging: None) -> None:
    def fake_run(config: Config, reload=None) -> None:
        logging.getLogger("x").debug("debug %s", "line")
        logging.getLogger("x").info("info line")

    stub = types.ModuleType("pgotel_proxy.proxy.server")
    stub.run = fake_run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pgotel_proxy.proxy.server", stub)

    result = invoke(["run", "--log-level", "warning"])
    assert result.exit_code == 0
    assert result.stderr == ""
    result = invoke(["run", "--log-level", "debug"])
    assert result.exit_code == 0
    assert "DEBUG" in result.stderr and "x: debug line" in result.stderr


@pytest.mark.parametrize("option", ["listen", "admin-listen"])
def test_address_in_use_is_one_line_and_exit_2(option: str, tmp_path: Path) -> None:
    """A second proxy on the same host: the taken address is named, no traceback, exit 2."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        address = "127.0.0.1:%d" % taken.getsockname()[1]
        args = ["run", "--upstream", "127.0.0.1:1", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
                "--no-tracing", f"--{option}", address]
        proc = subprocess.run([sys.executable, "-m", "pgotel_proxy", *args], env=_subprocess_env(),
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(PREFIX), lines[0]
    assert f"--{option}" in lines[0] and address in lines[0] and "in use" in lines[0], lines[0]
