"""One estimation pass: every value, delete-a-group jackknife replicate and null summary ``rank`` reports.

:func:`estimate` reads the rows once per family of metrics and returns an :class:`Estimates` (values, replicates,
intervals, calibrated nulls) that ``rank`` reads; no number is recomputed anywhere else.

* The jackknife exists once: the rows are split into G seeded groups (``torch.randperm(n, seed).chunk(G)``, the
  grouping of :func:`pairscout.ranking.compute.jackknife_ci`) shared by every metric, and a replicate is the value
  on all rows but one group. Every metric here is built from sums over rows or pairs of rows, so a replicate is the
  total minus that group's part:
  linear CKA (biased, debiased) from per-group feature products (:mod:`.linear`); RBF CKA from per-(group, group)
  sums of Gram-tile products (:mod:`.gram`); mutual k-NN and CKNNA from one top-2k neighbour list per row, the
  rare row whose list runs out searched again (:mod:`.neighbours`). Measures without such a form (SVCCA, ...) and
  neighbour metrics with clipping (the clip threshold depends on the rows) are evaluated on each subset.
* The null summaries come from the same sums: the closed-form CKA moments from the totals of the linear and RBF
  passes, mutual k-NN's closed-form moments and CKNNA's permutation null from the same lists.
* Memory O(n x tile + sum d^2 + G d1 d2): never an n x n matrix. Device and precision: the :class:`Engine`'s.
  Under ``torchrun`` each process sums its own rows and the sums are all-reduced (RBF tiles and neighbour search
  walk the other processes' rows in broadcast chunks); the same numbers as one process.

Example:
    >>> est = estimate([x1, x2], [y1], ["cka_linear", "mutual_knn"], settings)  # doctest: +SKIP
    >>> est.values["cka_linear"], est.interval("cka_linear")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np
import torch

from pairscout.estimation.engine import Engine, plain

log = logging.getLogger(__name__)

F64 = torch.float64
LINEAR = ("cka_linear", "cka_linear_debiased")
RBF = ("cka_rbf", "cka_rbf_debiased")
NEIGHBOUR = ("mutual_knn", "cknna")


@dataclass
class Estimates:
    """What one estimation pass gives, every tensor float64 on the CPU: ``values[m]`` (V, T), ``replicates[m]``
    (G, V, T) (absent without groups), ``nulls[m]`` (:class:`~pairscout.metrics.calibration.Calibration`),
    ``null_methods[m]``, ``recomputed[model]`` (rows whose neighbour list ran out and were searched again), and the
    seconds of every phase."""

    metrics: list[str]
    values: dict[str, torch.Tensor]
    replicates: dict[str, torch.Tensor] = field(default_factory=dict)
    nulls: dict[str, Any] = field(default_factory=dict)
    null_methods: dict[str, str] = field(default_factory=dict)
    recomputed: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def interval(self, metric: str, level: float = 0.95) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(low, high, se) of the delete-a-group jackknife: ``se^2 = (G-1)/G sum_g (theta_(g) - mean)^2``,
        ``theta +- z_(1+level)/2 se``."""
        r = self.replicates[metric]
        g = r.shape[0]
        se = ((g - 1) / g * ((r - r.mean(0)) ** 2).sum(0)).sqrt()
        z = NormalDist().inv_cdf(0.5 + level / 2)
        est = self.values[metric]
        return est - z * se, est + z * se, se

    def columns(self) -> dict[str, np.ndarray]:
        """Every (V, T) column of a ranking: ``<m>``, ``<m>_lo/_hi/_se`` and ``<m>_null/_null_sd/_z/_p/_p_holm
        (/_p_mc)``, as numpy arrays (converted once, here)."""
        out: dict[str, np.ndarray] = {}
        for m in self.metrics:
            out[m] = self.values[m].numpy()
            if m in self.replicates:
                lo, hi, se = self.interval(m)
                out[f"{m}_lo"], out[f"{m}_hi"], out[f"{m}_se"] = lo.numpy(), hi.numpy(), se.numpy()
        for m in self.metrics:
            cal = self.nulls.get(m)
            if cal is None:
                continue
            out[f"{m}_null"], out[f"{m}_null_sd"], out[f"{m}_z"] = cal.null_mean.numpy(), cal.null_sd.numpy(), cal.z.numpy()
            out[f"{m}_p"], out[f"{m}_p_holm"] = cal.p_value.numpy(), cal.p_holm.numpy()
            if cal.p_mc is not None:
                out[f"{m}_p_mc"] = cal.p_mc.numpy()
        return out


def jackknife_groups(n: int, groups: int, seed: int) -> torch.Tensor:
    """(n,) group of every row: ``torch.randperm(n, seed).chunk(groups)`` (all zeros without groups)."""
    gid = torch.zeros(n, dtype=torch.long)
    if groups > 1:
        for g, part in enumerate(torch.randperm(n, generator=torch.Generator().manual_seed(seed)).chunk(groups)):
            gid[part] = g
    return gid


class _Clock:
    """Phases of the pass: a progress line when each starts, seconds and shares at the end."""

    def __init__(self, progress: Callable[[str, int, int], None] | None) -> None:
        self.progress = progress
        self.times: dict[str, float] = {}
        self.t0 = time.perf_counter()
        self.name: str | None = None
        self.start = 0.0

    def phase(self, name: str) -> None:
        self.stop()
        self.name, self.start = name, time.perf_counter()
        if self.progress is not None:
            self.progress(f"metrics: {name}", 0, 1)

    def stop(self) -> None:
        if self.name is not None:
            dt = time.perf_counter() - self.start
            self.times[self.name] = self.times.get(self.name, 0.0) + dt
            if self.progress is not None:
                self.progress(f"metrics: {self.name}", 1, 1)
            self.name = None

    def report(self) -> dict[str, float]:
        self.stop()
        total = time.perf_counter() - self.t0
        for name, dt in self.times.items():
            log.info("metrics phase %-34s %8.2f s  %5.1f %%", name, dt, 100.0 * dt / total if total > 0 else 0.0)
        return {**{k: round(v, 4) for k, v in self.times.items()}, "total": round(total, 4)}


def estimate(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], metrics: Sequence[str], *, groups: int = 10,
             seed: int = 0, permutations: int = 199, null_method: str = "auto",
             options: Mapping[str, Mapping[str, Any]] | None = None, engine: Engine | None = None,
             progress: Callable[[str, int, int], None] | None = None) -> Estimates:
    """Values, jackknife replicates and nulls of ``metrics`` for every (xs[i], ys[j]) pair in one pass.

    Args:
        xs, ys: the rows of every vision / text model on the engine's device (under torchrun: this process's rows).
        metrics: measure names (:data:`pairscout.metrics.MEASURES`).
        groups: jackknife groups (0 or 1: no replicates); seeded ``seed`` (:func:`jackknife_groups`).
        permutations: Monte-Carlo budget of the nulls that need one (0: no nulls); metric i's null is seeded
            ``seed + 1000 i``; CKNNA gets at most :data:`~pairscout.metrics.calibration.CKNNA_PERM` at the default.
        null_method: ``auto`` (closed-form moments for CKA and mutual k-NN, permutations for CKNNA) or
            ``permutation`` (:func:`~pairscout.metrics.calibration.calibrate`).
        options: each metric's keyword options (``k``, ``preprocess``, ``sigma_frac``; registry defaults if absent).
        engine: device, precision and row shard (:class:`Engine`); default: one process where ``xs`` are, float64.
        progress: ``progress(phase, done, total)`` at the start and end of every phase.
    """
    from pairscout.metrics import registry
    from pairscout.metrics import sharded_rows as R
    from pairscout.metrics.calibration import CKNNA_PERM, N_PERM
    from pairscout.metrics.validate import check_not_constant, check_same_rows

    eng = engine or plain(xs[0].device)
    clock = _Clock(progress)
    clock.phase("prepare (centre, groups, bandwidths)")
    xs, ys = list(xs), list(ys)
    m, t = len(xs), len(ys)
    mats = [*xs, *ys]
    sharded = eng.sharded
    counts = R.shard_counts(xs[0].shape[0], xs[0].device) if sharded else None
    n = sum(counts) if counts is not None else check_same_rows({"xs": xs, "ys": ys}, min_rows=2, why="the metrics")
    if not sharded:
        check_not_constant(mats, [f"xs[{i}]" for i in range(m)] + [f"ys[{j}]" for j in range(t)],
                           "a similarity measure (every row is the same)")
    G = groups if groups > 1 else 0
    gid = jackknife_groups(n, G, seed)
    Gc = max(G, 1)  # groups the sums are split in (one without a jackknife)
    lo = sum(counts[: R.rank_world()[0]]) if counts is not None else 0
    local_gid = gid[lo:lo + xs[0].shape[0]]
    order = torch.argsort(local_gid, stable=True)
    seg = [0, *torch.bincount(local_gid, minlength=Gc).cumsum(0).tolist()]
    opts = {k: dict((options or {}).get(k, {})) for k in metrics}
    clips = any(opts[k].get("preprocess") is not None and opts[k]["preprocess"].clips for k in metrics if k in NEIGHBOUR)
    fam_lin = [k for k in metrics if k in LINEAR]
    fam_rbf = [k for k in metrics if k in RBF]
    fam_nb = [k for k in metrics if k in NEIGHBOUR and not clips]
    rest = [k for k in metrics if k not in (*fam_lin, *fam_rbf, *fam_nb)]
    values: dict[str, torch.Tensor] = {}
    reps: dict[str, torch.Tensor] = {}
    summaries: dict[str, tuple[list[dict[str, float]], list[float]]] = {}
    cdt = F64 if eng.precision == "float64" else torch.float32
    tol = 1e-10 if cdt == F64 else 1e-5
    n_sub = subset_rows(gid, G)

    def reduce(x: torch.Tensor) -> torch.Tensor:
        return R.reduce_across_ranks(x) if sharded else x

    def cka_of(cross: torch.Tensor, selfs: torch.Tensor) -> torch.Tensor:
        """CKA on [all rows, all but group 0, ...] (only all rows without groups)."""
        from pairscout.metrics.cka import cka_from_hsic

        return torch.stack([cka_from_hsic(cross[r].cpu(), selfs[r, :m].cpu(), selfs[r, m:].cpu())
                            for r in range(G + 1 if G else 1)])

    def keep_result(name: str, vals: torch.Tensor) -> None:
        values[name] = vals[0].to(F64).cpu()
        if G:
            reps[name] = vals[1:].to(F64).cpu()

    zc: list[torch.Tensor] = []
    if fam_lin or fam_rbf:
        from pairscout.metrics.cka import matmul_precision

        col = reduce(torch.cat([z.sum(0, dtype=F64) for z in mats]))
        dims = [z.shape[1] for z in mats]
        offs = [0, *np.cumsum(dims).tolist()]
        for k, z in enumerate(mats):
            zc.append((z.to(F64) - col[offs[k]:offs[k + 1]] / n)[order.to(z.device)].to(cdt))
        peak = torch.tensor([float(z.abs().max()) if z.numel() else 0.0 for z in zc], dtype=F64, device=zc[0].device)
        peak = R.reduce_across_ranks(peak, "max") if sharded else peak
        expo = [0 if p == 0.0 or not math.isfinite(p) else -math.frexp(p)[1] for p in peak.tolist()]
        zc = [z * 2.0**e if e else z for z, e in zip(zc, expo, strict=True)]
        with matmul_precision(eng.precision, zc[0].device):
            if fam_lin:
                from pairscout.estimation import linear as L

                clock.phase("linear CKA: per-group products")
                sums = [L.model_sums(z, seg, reduce) for z in zc]
                flags = [k.endswith("_debiased") for k in fam_lin]
                terms = [L.self_terms(s, flags) for s in sums]  # per model: (HSIC, tolerance base) per flag
                selfs = []
                for f in range(len(flags)):
                    cols = [torch.where(h <= tol * base.abs() / n_sub.to(h.device) ** 2, torch.zeros_like(h), h)
                            for h, base in (t[f] for t in terms)]
                    selfs.append(torch.stack(cols, 1))
                ybuf = torch.cat(zc[m:], 1)
                py = torch.stack([z.square().sum(1, dtype=F64) for z in zc[m:]], 1)
                cross = [torch.empty(Gc + 1, m, t, dtype=F64, device=zc[0].device) for _ in flags]
                for i in range(m):
                    for c, o in zip(cross, L.cross_terms(zc[i], sums[i], ybuf, sums[m:], dims[m:], seg, flags, reduce, py),
                                    strict=True):
                        c[:, i] = o
                del ybuf, py
                for name, c, sf in zip(fam_lin, cross, selfs, strict=True):
                    keep_result(name, cka_of(c, sf))
                summaries["linear"] = ([], [])
                for s in sums:
                    from pairscout.metrics.calibration import qap_parts

                    ns, f2 = L.null_sums(s)
                    summaries["linear"][0].append(qap_parts(ns))
                    summaries["linear"][1].append(f2)
                del sums
            if fam_rbf:
                from pairscout.estimation import gram as Gm
                from pairscout.metrics.cka import median_sigma_tensor

                clock.phase("RBF CKA: bandwidths (median distance)")
                sf = float(opts[fam_rbf[0]].get("sigma_frac", 1.0))
                sig = [R.sharded_median_sigma(z, counts, sf) if sharded else median_sigma_tensor(z, sf) for z in mats]
                gammas = [1.0 / (2.0 * s * s) * 4.0 ** -e for s, e in zip(sig, expo, strict=True)]
                clock.phase("RBF CKA: Gram tiles")
                if sharded:
                    assert counts is not None
                    starts = [0, *np.cumsum(counts).tolist()]
                    ids = [starts[r] + torch.argsort(gid[starts[r]:starts[r + 1]], stable=True) for r in range(len(counts))]
                    sh = {"counts": counts, "ids": ids, "groups_of": [gid[i] for i in ids],
                          "chunk": min(R.CHUNK_ROWS, Gm.tile_rows(len(zc)))}
                    gs = Gm.gram_sums(zc, gammas, seg, n, Gc, gid.to(zc[0].device), sh)
                else:
                    gs = Gm.gram_sums(zc, gammas, seg, n, Gc, local_gid[order].to(zc[0].device))
                clock.phase("RBF CKA: replicates")
                for name, (c, sfs) in zip(fam_rbf, Gm.subset_hsic(gs, m, [k.endswith("_debiased") for k in fam_rbf], tol,
                                                                             G + 1 if G else 1),
                                          strict=True):
                    keep_result(name, cka_of(c, sfs))
                from pairscout.metrics.calibration import qap_parts

                nsums = [Gm.null_sums(gs, k) for k in range(len(zc))]
                summaries["rbf"] = ([qap_parts(s) for s, _ in nsums], [f for _, f in nsums])
                del gs
    del zc
    lists: tuple[list[Any], list[Any]] | None = None
    recomputed: dict[str, int] = {}
    if fam_nb:
        from pairscout.estimation import neighbours as N
        from pairscout.metrics.knn import Preprocess, pair_values

        k = int(opts[fam_nb[0]].get("k", 10))
        pre = opts[fam_nb[0]].get("preprocess") or Preprocess()
        clock.phase("neighbours: top-2k search")
        width = min(2 * k, n - 1)
        xl = [N.search(z, width, pre, counts) for z in xs]
        yl = [N.search(z, width, pre, counts) for z in ys]
        clock.phase("neighbours: values and replicates")
        out = {name: torch.empty(Gc + 1, m, t, dtype=F64) for name in fam_nb}
        gdev = gid.to(xl[0].idx.device)
        for r in range(G + 1 if G else 1):
            keep = torch.ones(n, dtype=torch.bool, device=gdev.device) if r == 0 else gdev != r - 1
            nx, ny = [a.subset(keep, k) for a in xl], [b.subset(keep, k) for b in yl]
            if r == 0:
                lists = (nx, ny)
            for name, v in pair_values(nx, ny, int(keep.sum()), fam_nb).items():
                out[name][r] = v
        for name in fam_nb:
            keep_result(name, out[name][: G + 1 if G else 1])
        recomputed = {f"xs[{i}]": a.recomputed for i, a in enumerate(xl)} | {f"ys[{j}]": b.recomputed for j, b in enumerate(yl)}
        if any(recomputed.values()):
            log.info("neighbour lists: %d rows searched again over %d subsets (their top-%d list ran out): %s",
                     sum(recomputed.values()), G, width,
                     ", ".join(f"{a}: {c}" for a, c in recomputed.items() if c))
    for name in rest:
        clock.phase(f"{registry.label(name)}: every subset")
        vals = [registry.pair_metric(name, xs, ys, engine=eng, **opts[name])]
        for g in range(G):
            vals.append(registry.pair_metric(name, xs, ys, engine=eng, rows=gid != g, **opts[name]))
        keep_result(name, torch.stack(vals))

    nulls: dict[str, Any] = {}
    how: dict[str, str] = {}
    if permutations > 0:
        from pairscout.metrics import calibration as C

        for i, name in enumerate(metrics):
            clock.phase(f"null: {registry.label(name)}")
            seed_i = seed + 1000 * i
            method = null_method
            if name not in (*C.CKA_METRICS, *C.NEIGHBOUR_METRICS):
                how[name] = "not calibrated (no null for this measure yet)"
                continue
            if name in (*LINEAR, *RBF) and method == "auto" and (name in fam_lin or name in fam_rbf):
                summ, norm2 = summaries["linear" if name in LINEAR else "rbf"]
                mean, sd, p = C.cka_null(summ, norm2, m, name.endswith("_debiased"), values[name])
                cal = C.finish(name, values[name], mean, sd, p, C.CKA_HOW, 0, seed_i)
            elif name in fam_nb and lists is not None:
                used = permutations if name == "mutual_knn" else min(permutations, CKNNA_PERM if permutations == N_PERM else permutations)
                cal = C.neighbour_null(name, lists[0], lists[1], n, values[name], n_perm=used, seed=seed_i, method=method)
            else:
                cal = C.calibrate(xs, ys, name, values[name], n_perm=permutations, seed=seed_i, method=method,
                                  cknna_perm=CKNNA_PERM if permutations == N_PERM else permutations, sharded=sharded,
                                  **opts[name], **({"precision": eng.precision} if name.startswith("cka_") else {}))
            nulls[name], how[name] = cal, cal.method
    timings = clock.report()
    return Estimates(list(metrics), values, reps, nulls, how, recomputed, timings)


def subset_rows(gid: torch.Tensor, groups: int) -> torch.Tensor:
    """(G+1,) rows of [all rows, all but group 0, ...] (float64)."""
    n = gid.numel()
    sizes = torch.bincount(gid, minlength=max(groups, 1)).to(F64)
    return torch.cat([torch.tensor([float(n)], dtype=F64), n - sizes])


__all__ = ["Engine", "Estimates", "estimate", "jackknife_groups", "plain"]
