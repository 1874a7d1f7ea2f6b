"""All-pairs linear CKA on rows sharded across torch.distributed ranks: the single-process values, exactly.

Under ``torchrun`` each rank holds 1/world of the rows of every model. Linear HSIC (biased and debiased) is a
function of sums over rows only, so each rank computes its partial sums and one ``all_reduce`` (SUM) per
statistic makes them global:

1. column sums of every model -> the global column means (float64);
2. ``X_i^T Y_j`` and ``Z_k^T Z_k`` of the centred local rows -> summed over ranks, then squared
   (``<K_i, L_j> = ||X_i^T Y_j||_F^2``; squaring after the sum is what makes it exact);
3. the per-row vectors every HSIC formula needs, ``r = K 1`` (from the global centred column sums) and
   ``d = diag K``, enter only through inner products over rows, ``sum_a u_a v_a``: one (2M, 2M) Gram of the
   stacked local vectors, plus their sums, is all-reduced.

The result equals :func:`~pairscout.metrics.cka.all_pairs_hsic` on the concatenated rows to float64 rounding
(tested with 2 gloo processes). Outside a process group it runs on the local rows alone. Backend: any that
supports ``all_reduce`` on the tensors' device (NCCL on GPUs, gloo on CPUs).

The registry's sharded forms of the measures live here (:func:`sharded_cka`, :func:`sharded_mutual_knn`,
:func:`sharded_cknna`); callers do not choose them: :func:`pairscout.metrics.pair_metric` runs them when its
engine is sharded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from pairscout.errors import MetricError
from pairscout.metrics.cka import HSICResult
from pairscout.metrics.validate import ArrayLike, as_matrices, check_same_rows

F64 = torch.float64


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _local(zs: ArrayLike | Sequence[ArrayLike], name: str, device: torch.device | None = None) -> list[torch.Tensor]:
    """Checked local shards; a rank may hold no rows (an empty (0, d) shard is allowed here)."""
    items = [zs] if isinstance(zs, torch.Tensor | np.ndarray) else list(zs)
    out = []
    for i, z in enumerate(items):
        zt = torch.as_tensor(z) if isinstance(z, np.ndarray) else z
        if isinstance(zt, torch.Tensor) and zt.ndim == 2 and zt.shape[0] == 0 and zt.shape[1] > 0:
            out.append(zt.to(device or zt.device, torch.float32 if not zt.is_floating_point() else zt.dtype))
        else:
            out.append(as_matrices([z], f"{name}[{i}]", device)[0])
        device = out[0].device
    if not out:
        raise MetricError(f"{name} is an empty list of embeddings.", fix="pass at least one (n, d) matrix.")
    return out


def sharded_all_pairs_hsic(xs: ArrayLike | Sequence[ArrayLike], ys: ArrayLike | Sequence[ArrayLike],
                           debiased: bool = False, *, precision: str = "float64") -> HSICResult:
    """Linear HSIC of every (x, y) pair from this rank's rows and every other rank's (see the module docstring).

    Args:
        xs, ys: this rank's rows of every vision / text model (the same global rows across models; any split
            of the rows over ranks, not necessarily equal).
        debiased: Song et al.'s HSIC_1 instead of the biased HSIC_0.
        precision: "float64" (default) or "float32" products; sums across ranks are float64 either way.

    Raises:
        MetricError: mismatched rows, too few global rows, constant features (after the global reduction).
    """
    if precision not in ("float64", "float32"):
        raise MetricError(f"unknown precision {precision!r}.", fix="use 'float64' or 'float32'.")
    xs_t = _local(xs, "xs")
    ys_t = _local(ys, "ys", device=xs_t[0].device)
    n_local = check_same_rows({"xs": xs_t, "ys": ys_t}, min_rows=0)
    mats = [*xs_t, *ys_t]
    m, t = len(xs_t), len(ys_t)
    dev = mats[0].device
    cdt = F64 if precision == "float64" else torch.float32
    dims = [z.shape[1] for z in mats]
    offs = [0]
    for d in dims:
        offs.append(offs[-1] + d)

    head = torch.zeros(1 + offs[-1], dtype=F64, device=dev)
    head[0] = n_local
    for k, z in enumerate(mats):
        head[1 + offs[k]:1 + offs[k + 1]] = z.sum(0, dtype=F64)
    _all_reduce(head)
    n = int(round(float(head[0])))
    if n < (4 if debiased else 2):
        raise MetricError(f"only {n} rows over all ranks; {'the debiased estimator' if debiased else 'CKA'} needs "
                          f"at least {4 if debiased else 2}.", fix="use more rows.")
    mus = [head[1 + offs[k]:1 + offs[k + 1]] / n for k in range(len(mats))]
    zc = [(z.to(F64) - mu).to(cdt) for z, mu in zip(mats, mus, strict=True)]

    # 2. feature-space products, summed over ranks, squared after the sum
    cross_p = [zc[i].T @ torch.cat(zc[m:], 1) for i in range(m)] if m and t else []
    self_p = [z.T @ z for z in zc]
    flat = torch.cat([p.reshape(-1).to(F64) for p in [*cross_p, *self_p]])
    _all_reduce(flat)
    pos = 0
    cross = torch.zeros(m, t, dtype=F64, device=dev)
    for i in range(m):
        size = dims[i] * (offs[-1] - offs[m])
        block = flat[pos:pos + size].reshape(dims[i], -1).square()
        pos += size
        for j in range(t):
            cross[i, j] = block[:, offs[m + j] - offs[m]:offs[m + j + 1] - offs[m]].sum()
    self_ = torch.empty(len(mats), dtype=F64, device=dev)
    for k, d in enumerate(dims):
        self_[k] = flat[pos:pos + d * d].square().sum()
        pos += d * d

    # 3. row vectors r = K 1 = Zc (Zc^T 1) with the GLOBAL centred column sums, d = diag K; their inner products
    csum = torch.cat([z.sum(0, dtype=F64) for z in zc])
    _all_reduce(csum)
    r = [zc[k].to(F64) @ csum[offs[k]:offs[k + 1]] for k in range(len(mats))]
    dg = [zc[k].to(F64).square().sum(1) for k in range(len(mats))]
    v = torch.stack([*r, *dg]) if n_local else torch.zeros(2 * len(mats), 0, dtype=F64, device=dev)
    gram = torch.cat([(v @ v.T).reshape(-1), v.sum(1)])
    _all_reduce(gram)
    nz = len(mats)
    vv = gram[: 4 * nz * nz].reshape(2 * nz, 2 * nz)
    vs = gram[4 * nz * nz:]

    def hsic(s: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        rr, dd = vv[a][:, b], vv[nz + a][:, nz + b]
        rd, dr = vv[a][:, nz + b], vv[nz + a][:, b]
        sr_a, sr_b, sd_a, sd_b = vs[a], vs[b], vs[nz + a], vs[nz + b]
        if not debiased:
            return (s - (2.0 / n) * rr + sr_a[:, None] * sr_b[None, :] / n**2) / (n - 1) ** 2
        st = s - dd
        rt = rr - rd - dr + dd
        sums = (sr_a - sd_a)[:, None] * (sr_b - sd_b)[None, :]
        return (st + sums / ((n - 1) * (n - 2)) - (2.0 / (n - 2)) * rt) / (n * (n - 3))

    ix, iy, iall = torch.arange(m), torch.arange(m, nz), torch.arange(nz)
    cross_h = hsic(cross, ix, iy)
    self_h = hsic(torch.diag(self_), iall, iall).diagonal().clone()
    for k in range(nz):
        if float(self_[k]) == 0.0:
            side, pos_k = ("xs", k) if k < m else ("ys", k - m)
            raise MetricError(f"{side}[{pos_k}] has constant features (every column has zero variance); CKA is "
                              "undefined.", fix="drop that model or check that its encoder produced real embeddings.")
    base = self_ - vv.diagonal()[nz:] if debiased else self_
    tol = 1e-10 if cdt == F64 else 1e-5
    self_h = torch.where(self_h <= tol * base.abs() / (n * n), torch.zeros_like(self_h), self_h)
    return HSICResult(cross_h.cpu(), self_h[:m].cpu(), self_h[m:].cpu(), n, "linear", debiased, "feature", None)


def sharded_all_pairs_cka(xs: ArrayLike | Sequence[ArrayLike], ys: ArrayLike | Sequence[ArrayLike],
                          debiased: bool = False, *, precision: str = "float64") -> torch.Tensor:
    """(m, t) linear CKA over the rows of every rank (see :func:`sharded_all_pairs_hsic`)."""
    return sharded_all_pairs_hsic(xs, ys, debiased, precision=precision).cka()


def sharded_cka(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], kernel: str = "linear", debiased: bool = False, *,
                sigma_frac: float = 1.0, sigmas: Sequence[float] | None = None, precision: str | None = None) -> torch.Tensor:
    """(m, t) float64 CPU CKA from this rank's rows, equal to one process's value on all rows: linear from all-reduced
    feature products (:func:`sharded_all_pairs_cka`), RBF from Gram-tile sums
    (:func:`pairscout.metrics.sharded_rows.sharded_rbf_hsic`). ``precision``: float64 (default), float32 or tf32
    products. The registry's sharded form of the CKA measures (:func:`pairscout.metrics.pair_metric` runs it)."""
    from pairscout.metrics import sharded_rows as R
    from pairscout.metrics.cka import matmul_precision

    precision = str(precision or "float64")
    if sigmas is not None:
        raise MetricError("explicit RBF bandwidths (sigmas) are not supported on sharded rows.",
                          fix="pass sigma_frac (the median heuristic on the same rows as one process).")
    if kernel == "linear":
        with matmul_precision(precision, xs[0].device):
            return sharded_all_pairs_cka(xs, ys, debiased, precision="float64" if precision == "float64" else "float32")
    return R.sharded_rbf_hsic(xs, ys, debiased, sigma_frac=float(sigma_frac), precision=precision).cka()  # type: ignore[arg-type]


def _neighbour_values(name: str, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], k: int,
                      preprocess: object) -> torch.Tensor:
    """Mutual k-NN or CKNNA (``name``) from this rank's rows: sharded neighbour search, lists gathered."""
    from pairscout.metrics import knn as _knn
    from pairscout.metrics import sharded_rows as R

    counts = R.shard_counts(xs[0].shape[0], xs[0].device)
    k = int(k)
    pre = preprocess or _knn.Preprocess()
    n = sum(counts)
    if name == "cknna" and k < 2:
        raise MetricError(f"CKNNA needs k >= 2 neighbours (got k={k}).", fix="use k >= 2 (default 10).")
    if n < max(k + 1, 4 if name == "cknna" else 2):
        raise MetricError(f"only {n} rows over all ranks; k={k} neighbours need more.", fix="use more rows or a smaller k.")
    nxs = [R.sharded_neighbours(x, counts, k, pre) for x in xs]  # type: ignore[arg-type]
    nys = [R.sharded_neighbours(y, counts, k, pre) for y in ys]  # type: ignore[arg-type]
    return _knn.pair_values(nxs, nys, n, [name])[name]


def sharded_mutual_knn(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], k: int = 10,
                       preprocess: object = None) -> torch.Tensor:
    """(m, t) float64 CPU mutual k-NN from this rank's rows: the neighbour lists found sharded and gathered
    (:func:`pairscout.metrics.sharded_rows.sharded_neighbours`), then the single-process code
    (:func:`pairscout.metrics.knn.pair_values`; the same value)."""
    return _neighbour_values("mutual_knn", xs, ys, k, preprocess)


def sharded_cknna(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], k: int = 10, preprocess: object = None) -> torch.Tensor:
    """(m, t) float64 CPU CKNNA from this rank's rows (gathered neighbour lists, as :func:`sharded_mutual_knn`)."""
    return _neighbour_values("cknna", xs, ys, k, preprocess)
