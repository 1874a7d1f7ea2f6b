"""The ``pairscout`` command line: parses, calls the core, prints. No logic of its own.

Modules: :mod:`._ui` (consoles, errors, progress, formatting), :mod:`._options` (shared options; defaults
read from the core's dataclasses), :mod:`.data` (zoo, encode, cache), :mod:`.rank` (rank, report),
:mod:`.align` (probe, align, zero-shot). This module only assembles the app; command modules never
import it, so the package has no import cycle (tests/test_imports.py checks). Importing it does not
import torch: ``pairscout --help`` stays fast.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from pairscout.cli import _ui as ui
from pairscout.cli import align as _align
from pairscout.cli import data as _data
from pairscout.cli import rank as _rank
from pairscout.cli._options import checked
from pairscout.errors import PairscoutError
from pairscout.version import __version__

__all__ = ["app", "main"]

app = typer.Typer(
    name="pairscout",
    help="Pick the frozen vision and text encoders to pair before you spend GPU-days aligning them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _show_version(value: bool) -> None:
    if value:
        ui.out.print(f"pairscout {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Our own progress display only: silence the per-load bars of transformers and the hub client."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


app.add_typer(_data.zoo_app, name="zoo")
app.add_typer(_data.cache_app, name="cache")
app.command("encode")(checked(_data.encode))
app.command("rank")(checked(_rank.rank))
app.command("probe")(checked(_align.probe))
app.command("align")(checked(_align.align))
app.command("report")(checked(_rank.report))
app.command("zero-shot")(checked(_align.zero_shot))


def main() -> None:
    distributed = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun (torch imported only then)
        from pairscout import distributed

        if distributed.init_from_env() and not distributed.is_main():
            ui.err.quiet = ui.out.quiet = True  # only rank 0 talks
    clean = False
    try:
        app()
        clean = True
    except SystemExit as e:  # typer ends every command with SystemExit; 0 / None is a clean end
        clean = e.code in (0, None)
        raise
    except PairscoutError as e:  # raised outside a command body (should not happen, but never a traceback)
        ui.error(str(e))
        sys.exit(e.exit_code)
    finally:
        if distributed is not None:
            distributed.shutdown(clean)
