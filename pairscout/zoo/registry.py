"""Named zoos and zoo resolution.

A zoo is a TOML file with top-level ``name`` / ``description`` and ``[[encoder]]`` tables (see
:class:`~pairscout.zoo.spec.EncoderSpec` for the fields). Named zoos ship as package data in
``pairscout/zoo/zoos/``. ``--vision-zoo`` / ``--text-zoo`` accept a zoo name, a TOML path, or a
comma-separated list of encoder ids (the prefix says the source).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pairscout.errors import ZooError
from pairscout.files import read_regular_text
from pairscout.zoo.spec import EncoderSpec, Modality


@dataclass(frozen=True)
class Zoo:
    name: str
    description: str
    encoders: tuple[EncoderSpec, ...]
    source: str
    """Where the zoo came from: ``package:<name>``, a file path, or ``ids``."""

    def of(self, modality: Modality) -> tuple[EncoderSpec, ...]:
        return tuple(e for e in self.encoders if e.modality == modality)

    def to_dict(self) -> dict:
        return {"name": self.name, "source": self.source, "encoders": [e.to_dict() for e in self.encoders]}


def _zoo_dir():
    return resources.files("pairscout.zoo") / "zoos"


def available_zoos() -> list[str]:
    """Names of the zoos shipped with the package."""
    return sorted(p.name[: -len(".toml")] for p in _zoo_dir().iterdir() if p.name.endswith(".toml"))


def _parse(text: str, where: str) -> tuple[str, str, list[EncoderSpec]]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ZooError(f"{where} is not valid TOML ({e}).", fix="correct the file's syntax.") from None
    entries = data.get("encoder")
    if not isinstance(entries, list) or not entries:
        raise ZooError(f"{where} defines no encoders.", fix="add at least one [[encoder]] table with id and modality.")
    for k, e in enumerate(entries):
        if not isinstance(e, dict):
            raise ZooError(f"{where}: encoder entry {k + 1} is a {type(e).__name__} ({str(e)[:40]}), not a table.",
                           fix="write each encoder as an [[encoder]] table with id and modality.")
    specs = [EncoderSpec.from_dict(dict(e), where=where) for e in entries]
    _check_unique(specs, where)
    for key in ("name", "description"):
        if key in data and not isinstance(data[key], str):
            raise ZooError(f"{where}: the zoo's {key} is a {type(data[key]).__name__}, not a string.", fix=f'write {key} = "..." in quotes.')
    return str(data.get("name", Path(where).stem)), str(data.get("description", "")), specs


def _check_unique(specs: list[EncoderSpec], where: str) -> None:
    """Every entry has its own name and its own settings. One id may appear with different settings (the same
    model pooled two ways); results, probes and alignments name entries by ``name``."""
    names = [s.name for s in specs]
    dupe_names = sorted({n for n in names if names.count(n) > 1})
    keys = [s.fingerprint() for s in specs]
    dupes = sorted({s.id for s, k in zip(specs, keys, strict=True) if keys.count(k) > 1})
    if dupes or dupe_names:
        raise ZooError(f"{where} lists {', '.join(dupes or dupe_names)} twice.",
                       fix="give each encoder a unique name, and an id used twice different settings (pooling, layer, ...).")


def load_zoo_file(path: str | Path) -> Zoo:
    path = Path(path)
    if not path.exists():
        raise ZooError(f"zoo file {path} does not exist.", fix=f"pass a TOML path or one of the named zoos: {', '.join(available_zoos())}.")
    try:
        text = read_regular_text(path, "utf-8-sig", 16 * 2**20)  # a BOM (Windows editors) is not TOML
    except UnicodeDecodeError as e:
        raise ZooError(f"zoo file {path} is not UTF-8 text (byte {e.start}: {e.reason}).", fix="save it as UTF-8 (TOML files must be UTF-8).") from None
    except OSError as e:
        raise ZooError(f"cannot read zoo file {path} ({e}).", fix="pass a readable TOML file.") from None
    name, desc, specs = _parse(text, str(path))
    return Zoo(name, desc, tuple(specs), str(path))


def get_zoo(name: str) -> Zoo:
    """A named zoo shipped with the package."""
    res = _zoo_dir() / f"{name}.toml"
    if not res.is_file():
        raise ZooError(f"no zoo named {name!r}.", fix=f"use one of {', '.join(available_zoos())}, a TOML path, or a comma list of ids.")
    zname, desc, specs = _parse(res.read_text(encoding="utf-8"), f"zoo {name!r}")
    return Zoo(zname, desc, tuple(specs), f"package:{name}")


def _shipped_specs() -> list[EncoderSpec]:
    return [spec for zname in available_zoos() for spec in get_zoo(zname).encoders]


def _find_shipped(ident: str) -> EncoderSpec | None:
    """The shipped encoder an id or a printed name means: exact id or name first, then either without regard to case,
    then the id without its source prefix ("all-MiniLM-L6-v2" for pack:all-MiniLM-L6-v2): the names tables print
    work as ids."""
    specs = _shipped_specs()
    exact = next((s for s in specs if ident in (s.id, s.name)), None)
    if exact is not None:
        return exact
    low = ident.lower()
    for match in (lambda s: low in (s.id.lower(), s.name.lower()), lambda s: s.id.split(":", 1)[-1].lower() == low):
        found: dict[str, EncoderSpec] = {}
        for s in specs:
            if match(s):
                found.setdefault(s.id, s)  # an id several entries share: the first one's settings
        if len(found) == 1:
            return next(iter(found.values()))
    return None


def _spec_from_id(ident: str, modality: Modality) -> EncoderSpec:
    """An id or name given on the command line: looked up in the shipped zoos first (to get their settings). An id
    that several entries share (one model, several poolings) takes the first one's; its name picks another. A name
    as the tables print it is accepted; a bare word that names nothing is an error suggesting the closest ids."""
    spec = _find_shipped(ident)
    if spec is not None:
        if spec.modality != modality:
            raise ZooError(f"{ident} is a {spec.modality} encoder, not a {modality} one.", fix=f"pass it to --{spec.modality}-zoo.")
        return spec
    if ":" not in ident:
        import difflib

        specs = [s for s in _shipped_specs() if s.modality == modality]
        keys = {k.lower(): s.id for s in specs for k in (s.name, s.id, s.id.split(":", 1)[-1])}
        close = list(dict.fromkeys(keys[k] for k in difflib.get_close_matches(ident.lower(), list(keys), n=3, cutoff=0.5)))
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ZooError(f"no zoo named {ident!r}, and no encoder has that id or name (ids carry their source, like pack:, hf:, timm:, baseline:).",
                       fix=f"{hint}`pairscout zoo show offline` lists the ids; zoos: {', '.join(available_zoos())}.")
    return EncoderSpec(id=ident, modality=modality)


def resolve_zoo(arg: str | Path | list[str | EncoderSpec] | tuple[str | EncoderSpec, ...], modality: Modality) -> Zoo:
    """Resolve a ``--vision-zoo`` / ``--text-zoo`` argument to a zoo holding only ``modality`` encoders.

    ``arg`` is a zoo name (``offline``), a path to a TOML file, or a comma list of encoder ids
    (``pack:efficientnet-lite0,timm:resnet50.a1_in1k``); from Python also a list (or tuple) of ids or
    :class:`EncoderSpec` objects. Ids found in a shipped zoo take its settings.
    """
    if isinstance(arg, list | tuple):
        return _zoo_from_list(arg, modality)
    if not isinstance(arg, str | Path):
        raise ZooError(f"the {modality} zoo is a {type(arg).__name__} ({str(arg)[:60]!r}).",
                       fix="pass a zoo name, a TOML path, a comma string of ids or a list of ids.")
    text = str(arg).strip()
    if not text:
        raise ZooError(f"the {modality} zoo is empty.", fix="pass a zoo name, a TOML path or a comma list of ids.")
    if text.endswith(".toml") or Path(text).exists():
        zoo = load_zoo_file(text)
    elif ":" not in text and "," not in text and text in available_zoos():
        zoo = get_zoo(text)
    else:
        ids = [t.strip() for t in text.split(",") if t.strip()]
        specs = [_spec_from_id(i, modality) for i in ids]
        _check_unique(specs, f"--{modality}-zoo {text!r}")
        zoo = Zoo("custom", "encoders given on the command line", tuple(specs), "ids")
    return _side(zoo, modality, ZooError(f"zoo {zoo.name!r} ({zoo.source}) has no {modality} encoders.",
                                         fix=f"add [[encoder]] entries with modality = \"{modality}\"."))


def _side(zoo: Zoo, modality: Modality, empty: ZooError) -> Zoo:
    """The zoo's encoders of one modality, or ``empty`` raised when it has none."""
    chosen = zoo.of(modality)
    if not chosen:
        raise empty
    return Zoo(zoo.name, zoo.description, chosen, zoo.source)


def _zoo_from_list(items: list | tuple, modality: Modality) -> Zoo:
    """A zoo of the ids (or specs) of a Python list: each item is one encoder."""
    bad = next((x for x in items if not isinstance(x, str | EncoderSpec) or (isinstance(x, str) and not x.strip())), None)
    if not items or bad is not None:
        what = "is empty" if not items else f"holds {bad!r} ({type(bad).__name__})"
        raise ZooError(f"the {modality} zoo list {what}.", fix="pass a list of encoder ids (strings such as 'pack:efficientnet-lite0').")
    specs = [x if isinstance(x, EncoderSpec) else _spec_from_id(x.strip(), modality) for x in items]
    _check_unique(specs, f"the {modality} zoo list")
    zoo = Zoo("custom", "encoders given as a list", tuple(specs), "ids")
    return _side(zoo, modality, ZooError(f"the {modality} zoo list has no {modality} encoders.",
                                         fix=f"list {modality} encoder ids."))
