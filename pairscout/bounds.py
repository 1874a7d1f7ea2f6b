"""The valid range of every numeric setting: one declarative table, checked in one place for the API and the CLI.

Each setting is named by its CLI option (``--grad-clip``); the settings dataclasses (:class:`RankSettings`,
:class:`TrainConfig`, :class:`ProbeSettings`, :class:`EncodeSettings`) check their fields against it in
``__post_init__`` (field ``grad_clip`` is option ``--grad-clip``; :data:`FIELD_OPTION` lists the few that
differ), and the API's plain arguments (``n``, ``seed``, ``test_fraction``) and the CLI's own options call
:func:`check`. A value outside its range is one line that names the option, the range and an example:
``--grad-clip -1`` would flip every gradient, ``--ci-groups 1`` would silently turn the intervals off,
``--seed -1`` would end in numpy's traceback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from pairscout.errors import PairscoutError

SEED_MAX = 2**32 - 1
"""numpy's legacy seeding and many tools take seeds below 2**32."""


@dataclass(frozen=True)
class Range:
    """A numeric setting's valid values: ``kind`` (int or float) between ``low`` and ``high`` (each bound
    inclusive unless ``*_open``), plus the isolated values in ``also`` (e.g. 0 = off); ``None`` when ``optional``."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    also: tuple[float, ...] = ()
    optional: bool = False
    example: str = ""
    """A valid value to suggest in the fix."""
    meaning: str = ""
    """What the isolated values (or None) mean, said in the message (``0: off``)."""

    def holds(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.kind is int and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if value in self.also:
            return True
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a finite number"
        lo = None if self.low is None else f"{'>' if self.low_open else '>='} {_fmt(self.low)}"
        hi = None if self.high is None else f"{'<' if self.high_open else '<='} {_fmt(self.high)}"
        if lo and hi:
            lb, rb = ("(" if self.low_open else "["), (")" if self.high_open else "]")
            text = f"{what} in {lb}{_fmt(self.low)}, {_fmt(self.high)}{rb}"
        else:
            text = " ".join(p for p in (what, lo or hi) if p)
        if self.also:
            text += f" (or {', '.join(_fmt(a) for a in self.also)})"
        return text + (f"; {self.meaning}" if self.meaning else "")


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _int(low: float, **kw: Any) -> Range:
    return Range(int, low, **kw)


RANGES: dict[str, Range] = {
    # data and encoding
    "--n": _int(1, optional=True, example="1000"),
    "--seed": _int(0, high=SEED_MAX, example="0"),
    "--batch-size": _int(1, optional=True, example="64"),
    "--workers": _int(0, optional=True, example="4"),
    "--chunk-batches": _int(1, example="16"),
    # rank
    "--ci-groups": _int(2, also=(0,), example="10", meaning="0 turns the intervals off (one group cannot make one)"),
    "--permutations": _int(0, example="199", meaning="0 turns calibration off"),
    "--knn-k": _int(1, example="10"),
    "--clip-quantile": Range(float, 0, 1, low_open=True, optional=True, example="0.95"),
    "--rbf-sigma-frac": Range(float, 0, low_open=True, example="1.0"),
    "--layer-rows": _int(4, example="1000"),
    "--top": _int(1, example="10"),
    # align (training) and probe
    "--out-dim": _int(1, example="1024"),
    "--hidden-mult": _int(1, example="8"),
    "--chunk": _int(1, optional=True, example="1024"),
    "--init-scale": Range(float, 0, low_open=True, example="20"),
    "--init-bias": Range(float, example="-10"),
    "--temperature": Range(float, 0, low_open=True, example="0.07"),
    "--lr": Range(float, 0, low_open=True, optional=True, example="1e-3"),
    "--weight-decay": Range(float, 0, example="1e-4"),
    "--steps": _int(1, optional=True, example="200"),
    "--epochs": Range(float, 0, low_open=True, optional=True, example="3"),
    "--warmup": Range(float, 0, 1, high_open=True, example="0.1"),
    "--min-lr": Range(float, 0, 1, example="0.0"),
    "--grad-clip": Range(float, 0, low_open=True, also=(0,), optional=True, example="1.0",
                         meaning="0 (or None) turns clipping off; a negative norm would flip every gradient"),
    "--eval-every": _int(0, example="50", meaning="0: only at the end"),
    "--checkpoint-every": _int(0, example="100", meaning="0: only at the end"),
    "--log-every": _int(1, example="10"),
    "--keep-checkpoints": _int(1, example="1"),
    "--test-fraction": Range(float, 0, 1, low_open=True, high_open=True, example="0.2"),
    "--top-k": _int(0, example="5"),
    "--bottom-k": _int(0, example="2"),
    "--middle-k": _int(0, example="3"),
    "--budget": _int(1, example="12600"),
}
"""Option -> its valid values. Every numeric setting of the API and the CLI is here."""

FIELD_OPTION = {"num_workers": "--workers"}
"""Dataclass fields whose option is not ``--`` + the field name with ``-`` for ``_``."""


def option_of(field_name: str) -> str:
    return FIELD_OPTION.get(field_name, "--" + field_name.replace("_", "-"))


def check(option: str, value: Any, error: type[PairscoutError] = PairscoutError) -> Any:
    """``value`` if it lies in ``option``'s range (:data:`RANGES`), else a one-line ``error``."""
    r = RANGES[option]
    if not r.holds(value):
        raise error(f"{option} {value!r} is not {r.describe()}.", fix=f"pass e.g. {option} {r.example}.")
    return value


def check_fields(obj: Any, error: type[PairscoutError] = PairscoutError) -> None:
    """Check every field of the dataclass ``obj`` that has a declared range (``None`` only where the field's
    type allows it)."""
    for f in fields(obj):
        opt = option_of(f.name)
        if opt not in RANGES:
            continue
        value = getattr(obj, f.name)
        if value is None and "None" in str(f.type):
            continue
        if value is None:
            raise error(f"{opt} None is not allowed here; it is {RANGES[opt].describe()}.", fix=f"pass e.g. {opt} {RANGES[opt].example}.")
        check(opt, value, error)
