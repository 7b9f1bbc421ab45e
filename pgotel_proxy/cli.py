"""The ``pgotel-proxy`` command line: the click group, ``run`` and ``check-config``.

Every config option is generated from :class:`pgotel_proxy.config.Config`;
this module declares no setting of its own except ``--config``.  Log setup
(text or JSON lines on stderr) is :mod:`pgotel_proxy.logsetup`'s.

Adding a command: write it in its own module as ::

    from pgotel_proxy.cli import main, config_options, load_from_cli, SectionedCommand

    @main.command(cls=SectionedCommand)   # cls only for sectioned --help
    @config_options                       # only if it needs the proxy config
    @click.pass_context
    def demo(ctx, config_file, **params):
        config = load_from_cli(ctx, config_file, params)
        ...

and add the module's dotted name to :data:`COMMAND_MODULES` at the bottom of
this file.  Import heavy or optional dependencies inside the command body so
that ``--help`` and the other commands keep working without them.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from pgotel_proxy import __version__
from pgotel_proxy.config import (
    CONFIG_ENV,
    GROUPS,
    OPTIONS,
    Config,
    ConfigError,
    default_text,
    dump_toml,
    env_name,
    field_description,
    field_group,
    field_metavar,
    flag_name,
    is_bool_field,
    is_list_field,
    load_config_with_sources,
)
from pgotel_proxy.logsetup import configure_logging

__all__ = [
    "main",
    "run",
    "check_config",
    "config_options",
    "load_from_cli",
    "configure_logging",
    "SectionedCommand",
    "COMMAND_MODULES",
]

PROG = "pgotel-proxy"
CONFIG_ERROR_EXIT = 2

log = logging.getLogger(__name__)


class _FieldOption(click.Option):
    """A click option generated from a Config field; remembers its help section."""

    def __init__(self, *args: Any, group: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group = group


class SectionedCommand(click.Command):
    """A command whose --help lists generated options under their config groups."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        general: list[tuple[str, str]] = []
        sections: dict[str, list[tuple[str, str]]] = {g: [] for g in GROUPS}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            group = getattr(param, "group", None)
            (sections[group] if group in sections else general).append(record)
        if general:
            with formatter.section("Options"):
                formatter.write_dl(general)
        for group in GROUPS:
            if sections[group]:
                with formatter.section(group):
                    formatter.write_dl(sections[group])


def _field_option(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    # Defaults stay in the model: click's default is None so that only flags
    # really given on the command line become overrides.
    help_text = f"{field_description(name)} [env: {env_name(name)}; default: {default_text(name)}]"
    common: dict[str, Any] = {"cls": _FieldOption, "group": field_group(name),
                              "help": help_text, "default": None}
    if is_bool_field(name):
        decls = [f"{flag_name(name)}/--no-{flag_name(name)[2:]}", name]
        return click.option(*decls, **common)
    if is_list_field(name):
        common["default"] = ()
        return click.option(flag_name(name), name, multiple=True, type=str,
                            metavar=field_metavar(name), **common)
    # Plain strings: pydantic does the checking so that a bad flag gets the
    # same one-line error as a bad environment variable or file entry.
    return click.option(flag_name(name), name, type=str, metavar=field_metavar(name), **common)


def config_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--config`` and one option per config option (:data:`OPTIONS`) to a click command."""
    # click lists options in reverse order of decoration.
    for name in reversed(OPTIONS):
        func = _field_option(name)(func)
    return click.option(
        "--config", "config_file", metavar="FILE", default=None, type=str,
        help=f"TOML file with options as top-level keys. [env: {CONFIG_ENV}]",
    )(func)


def _overrides(ctx: click.Context, params: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in OPTIONS:
        if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE:
            value = params[name]
            out[name] = list(value) if is_list_field(name) else value
    return out


def _load(ctx: click.Context, config_file: str | None,
          params: Mapping[str, Any]) -> tuple[Config, dict[str, str]]:
    overrides = _overrides(ctx, params)

    def label(name: str) -> str:
        if is_bool_field(name) and not overrides[name]:
            return f"--no-{flag_name(name)[2:]}"
        return flag_name(name)

    try:
        return load_config_with_sources(
            file=Path(config_file) if config_file else None,
            env=os.environ,
            overrides=overrides,
            override_label=label,
        )
    except ConfigError as exc:
        click.echo(f"{PROG}: config error: {exc}", err=True)
        ctx.exit(CONFIG_ERROR_EXIT)
        raise AssertionError("unreachable")  # ctx.exit raises


def load_from_cli(ctx: click.Context, config_file: str | None,
                  params: Mapping[str, Any]) -> Config:
    """The effective Config for a command decorated with :func:`config_options`.

    On a configuration problem prints the one-line error and exits with 2.
    """
    return _load(ctx, config_file, params)[0]


# -- commands ------------------------------------------------------------------

@click.group(context_settings={"help_option_names": ["-h", "--help"],
                               "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name=PROG,
                      message="%(prog)s %(version)s")
def main() -> None:
    """OpenTelemetry tracing proxy for PostgreSQL.

    Every option can also be set with a PGOTEL_* environment variable or in
    the TOML file given with --config; flags win over the environment, which
    wins over the file.
    """


@main.command(cls=SectionedCommand)
@config_options
@click.pass_context
def run(ctx: click.Context, config_file: str | None, **params: Any) -> None:
    """Run the proxy until SIGINT or SIGTERM."""
    config = load_from_cli(ctx, config_file, params)
    configure_logging(config.log_level, config.log_format)
    # Imported here: the server pulls in uvloop and OpenTelemetry, which
    # check-config and --help do not need.
    from pgotel_proxy.proxy.server import run as serve

    log.debug("starting with listen=%s upstream=%s", config.listen, config.upstream)
    try:
        # SIGHUP re-reads the same sources (file, environment, flags).
        code = serve(config, reload=lambda: load_from_cli(ctx, config_file, params))
    except ConfigError as exc:  # a listen address in use
        click.echo(f"{PROG}: config error: {exc}", err=True)
        ctx.exit(CONFIG_ERROR_EXIT)
    ctx.exit(int(code or 0))


@main.command("check-config", cls=SectionedCommand)
@config_options
@click.pass_context
def check_config(ctx: click.Context, config_file: str | None, **params: Any) -> None:
    """Validate the configuration and print the effective values (secrets masked)."""
    config, sources = _load(ctx, config_file, params)
    click.echo(dump_toml(config, sources), nl=False)


#: Modules that attach more subcommands to ``main`` with ``@main.command()``.
#: They import ``main`` from here; importing them after ``main`` exists
#: registers their commands.
COMMAND_MODULES: tuple[str, ...] = ("pgotel_proxy.demo", "pgotel_proxy.cli_cdc")

for _module in COMMAND_MODULES:
    importlib.import_module(_module)
