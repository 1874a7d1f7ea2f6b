"""Options shared by several commands. Defaults come from the core's dataclasses (read here, never restated)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin, get_type_hints

import typer
from typer.models import OptionInfo

from pairscout.metrics.registry import MEASURES, names_help
from pairscout.ranking.settings import RankSettings

RANK = RankSettings()

VisionZoo = Annotated[str, typer.Option("--vision-zoo", help="Zoo name, TOML path, or comma list of vision encoder ids.")]
TextZoo = Annotated[str, typer.Option("--text-zoo", help="Zoo name, TOML path, or comma list of text encoder ids.")]
DataOpt = Annotated[str, typer.Option("--data", "-d", help="'generated[:n=..,seed=..]', a CSV/JSONL manifest, COCO caption JSON, image folder (sidecar .txt or metadata.jsonl), WebDataset tar(s), or a Hugging Face dataset: save_to_disk folder, .parquet/.arrow file, hf:ORG/NAME[:SPLIT].")]
ImageColOpt = Annotated[str | None, typer.Option("--image-column", help="Image column of a manifest or Hugging Face dataset (default: detected: image, jpg, img, file_name, ...).", show_default=False)]
CaptionColOpt = Annotated[str | None, typer.Option("--caption-column", help="Caption column (default: detected: caption, captions, text, sentences, ...; a list cell is several captions).", show_default=False)]
LabelColOpt = Annotated[str | None, typer.Option("--label-column", help="Label column (default: detected: label, class, category, ...; '' for none).", show_default=False)]
NOpt = Annotated[int | None, typer.Option("--rows", "--n", help="Rows: the generated dataset renders N rows; a file dataset gives a fixed-seed random subset of N (--n is the same; under torchrun write --rows, which torchrun's own parser leaves alone).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the generated data (unless its spec sets one), subsets and splits.")]
CacheOpt = Annotated[Path | None, typer.Option("--cache-dir", help="Embedding cache folder (default: $PAIRSCOUT_CACHE or ~/.cache/pairscout).")]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Let zoo entries with trust_remote_code run Python code from their model repository.")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps (default: auto).")]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", help="Images or captions per batch (default: 64 images, 256 captions).")]
WorkersOpt = Annotated[int | None, typer.Option("--workers", help="Image-loading processes (default: CPU count - 1, at most 8).")]
SkipBadOpt = Annotated[bool, typer.Option("--skip-bad", help="Skip rows whose image is missing or corrupt, and report the count.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (everything human goes to stderr).")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log cache hits, resumes and each result.")]
ReportOpt = Annotated[bool, typer.Option("--report", help="Also write (or refresh) report.html in the output folder.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace earlier results in the output folder.")]
RunArg = Annotated[Path | None, typer.Argument(help="Folder of a `pairscout rank --out` run (its pairs, zoos, data and cache).", show_default=False)]
RunAlias = Annotated[Path | None, typer.Option("--run", "-r", hidden=True, help="Old spelling of the RUN argument.")]
MetricsHelp = f"Comma list of pair metrics from {names_help()} (default: {', '.join(RANK.metrics)})."
PrimaryHelp = "Metric that ranks the pairs (default: cka_linear; cka_linear_debiased below 10,000 rows)."


def given(cls: type, **values: Any) -> Any:
    """``cls(**values)`` without the values the user did not give (None): the dataclass owns those defaults."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if v is not None and k in names})


def checked(command: Callable[..., Any]) -> Callable[..., Any]:
    """``command`` that first checks each of its numeric options against :data:`pairscout.bounds.RANGES` (the
    table the API's settings use), before anything is read, loaded or encoded: one line naming the option."""
    from pairscout.bounds import RANGES, check
    from pairscout.cli import _ui as ui

    sig = inspect.signature(command)
    ranged = {}
    for name, hint in get_type_hints(command, include_extras=True).items():
        if get_origin(hint) is not Annotated:
            continue
        base, *extra = get_args(hint)
        if not ({int, float} & ({base} | set(get_args(base)))):
            continue
        info = next((m for m in extra if isinstance(m, OptionInfo)), None)
        decls = [d for d in (getattr(info, "param_decls", None) or ()) if d.startswith("--")] or ["--" + name.replace("_", "-")]
        opt = next((d for d in decls if d in RANGES), None)
        if opt is not None:
            ranged[name] = opt

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        values = sig.bind_partial(*args, **kwargs).arguments
        with ui.user_errors():
            for name, opt in ranged.items():
                if values.get(name) is not None:
                    check(opt, values[name])
        return command(*args, **kwargs)

    run.ranged = ranged  # type: ignore[attr-defined]  # which options are checked (tests read it)
    return run


def columns(image: str | None, caption: str | None, label: str | None) -> dict[str, str] | None:
    """The column names the user gave (``--image-column`` ...), or None for none."""
    given = {k: v for k, v in (("image", image), ("caption", caption), ("label", label)) if v is not None}
    return given or None


def data_with_columns(data: str | None, image: str | None, caption: str | None, label: str | None) -> Any:
    """``data`` as given, or loaded with the chosen columns when any was given (commands whose core takes a
    dataset spec or a loaded dataset: probe, align)."""
    cols = columns(image, caption, label)
    if cols is None or data is None:
        if cols is not None:
            from pairscout.errors import PairscoutError

            raise PairscoutError("--image-column / --caption-column / --label-column need --data (a rank run records its columns).",
                                 fix="drop them, or pass --data with the dataset.")
        return data
    from pairscout.data import load_dataset

    return load_dataset(data, image_column=cols.get("image"), caption_column=cols.get("caption"), label_column=cols.get("label"))


def pick_run(run: Path | None, alias: Path | None) -> Path | None:
    """The run folder from the argument or the hidden ``--run`` option (old commands keep working)."""
    from pairscout.errors import PairscoutError

    if run is not None and alias is not None and run != alias:
        raise PairscoutError(f"got two run folders ({run} and --run {alias}).", fix="pass the run folder once, as the first argument.")
    return run if run is not None else alias


assert set(RANK.metrics) <= set(MEASURES)
