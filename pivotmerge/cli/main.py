"""The `pivotmerge` command line.

Subcommands are loaded lazily from the table below, so that `pivotmerge merge`
does not import the web service and the engine never imports it statically.
"""

from __future__ import annotations

import importlib
import sys

import click

from pivotmerge.errors import PivotMergeError

# name -> "module:attribute" of a click command
COMMANDS: dict[str, str] = {
    "bench": "pivotmerge.cli.bench:bench",
    "merge": "pivotmerge.cli.commands:merge_command",
    "methods": "pivotmerge.cli.commands:methods_command",
    "analyze": "pivotmerge.cli.commands:analyze_command",
    "make-example": "pivotmerge.data.example:make_example_command",
    "evaluate": "pivotmerge.data.evaluate:evaluate_command",
    "fold": "pivotmerge.analysis.fold_repo:fold_command",
    "serve": "app.cli:serve",
    "quickstart": "app.cli:quickstart",
    "admin": "app.cli:admin",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pivotmerge")
def cli() -> None:
    """Merge multimodal (LLaVA-style) models with PivotMerge and the standard baselines.

    Start with `pivotmerge quickstart`, or `pivotmerge make-example DIR` and
    `pivotmerge merge SPEC -o OUT`. Every command has --help.
    """


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors exit 2 with one readable line, never a traceback."""
    try:
        cli.main(args=argv, standalone_mode=False)
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
