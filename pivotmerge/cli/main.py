"""The `pivotmerge` command line.

Subcommands are loaded lazily: the engine's from the table below, the service's
(serve, quickstart, admin) from the `pivotmerge.commands` entry-point group that
`pip install 'pivotmerge[service]'` brings, so the engine never names the service
and `pivotmerge merge` imports neither.
"""

from __future__ import annotations

import importlib
import os
import sys
from importlib.metadata import entry_points

import click

from pivotmerge.errors import PivotMergeError

# name -> "module:attribute" of a click command
COMMANDS: dict[str, str] = {
    "bench": "pivotmerge.cli.bench_commands:bench",
    "merge": "pivotmerge.cli.commands:merge_command",
    "methods": "pivotmerge.cli.commands:methods_command",
    "analyze": "pivotmerge.cli.commands:analyze_command",
    "fold": "pivotmerge.cli.commands:fold_command",
    "make-example": "pivotmerge.cli.data_commands:make_example_command",
    "evaluate": "pivotmerge.cli.data_commands:evaluate_command",
    "inspect": "pivotmerge.cli.inspect:inspect_command",
    "push": "pivotmerge.cli.hub:push_command",
    "jobs": "pivotmerge.cli.jobs:jobs",
    "tune": "pivotmerge.cli.tune:tune_command",
}
# Other packages add commands under this entry-point group (name = "module:attribute"); this
# distribution adds the service's, which import only once `pivotmerge[service]` is installed.
COMMAND_GROUP = "pivotmerge.commands"
SERVICE_COMMANDS = ("serve", "quickstart", "admin")
SERVICE_HINT = "the HTTP service's commands; install them with: pip install 'pivotmerge[service]'"
# Engine commands whose work is complete when they return (outputs moved into place, stdout
# written). A process running one ends at once instead of tearing down torch's modules,
# which costs seconds of CPU (docs/performance.md).
EXIT_AT_ONCE = ("merge", "fold", "analyze")


def all_commands() -> dict[str, str]:
    """name -> "module:attribute": the engine's commands and those installed packages contribute."""
    return {**{ep.name: ep.value for ep in entry_points(group=COMMAND_GROUP)}, **COMMANDS}


class NotInstalled(Exception):
    """A contributed command whose package's dependencies are missing."""


def load_command(target: str) -> click.Command:
    module, attr = target.split(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as exc:
        raise NotInstalled(f"{exc.name} is not installed") from None


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(all_commands())

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = all_commands().get(name)
        if target is None and name not in SERVICE_COMMANDS:
            return None
        try:
            if target is None:
                raise NotInstalled("not installed")
            return load_command(target)
        except NotInstalled as exc:
            raise click.UsageError(f"`pivotmerge {name}` is one of {SERVICE_HINT} ({exc})", ctx) from None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        commands = all_commands()
        limit = formatter.width - 6 - max(map(len, commands))  # as click.Group lays it out
        available, missing = [], []
        for name, target in sorted(commands.items()):
            try:
                available.append((name, load_command(target).get_short_help_str(limit)))
            except NotInstalled:
                missing.append(name)
        missing += [n for n in SERVICE_COMMANDS if n not in commands]
        with formatter.section("Commands"):
            formatter.write_dl(available)
        if missing:
            with formatter.section("Not installed"):
                formatter.write_dl([(", ".join(missing), SERVICE_HINT)])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pivotmerge")
def cli() -> None:
    """Merge multimodal (LLaVA-style) models with PivotMerge and the standard baselines.

    Start with `pivotmerge quickstart`, or `pivotmerge make-example DIR` and
    `pivotmerge merge SPEC -o OUT`. Every command has --help.
    """


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors exit 2 with one readable line, never a traceback.

    Without `argv` (the console script) main owns the process, which ends with
    os._exit after an EXIT_AT_ONCE command; called with `argv`, it returns.
    """
    args = sys.argv[1:] if argv is None else argv
    try:
        cli.main(args=args, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2 if exc.exit_code in (1, 2) else exc.exit_code)
    except PivotMergeError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    if argv is None and args[:1] and args[0] in EXIT_AT_ONCE:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
