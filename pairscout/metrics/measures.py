"""More representation-similarity measures: CCA family, Procrustes, RSA, cycle k-NN, matching accuracy.

Every function takes two embeddings of the same n rows, ``x`` (n, d1) and ``y`` (n, d2), torch or numpy, and
returns a float oriented so that **higher means more similar**, with the range given in its docstring.
Computations are float64 on the inputs' device (the SVDs and the assignment solver on the CPU where noted).

================  ==========  ======================================================  =====================
measure           range       invariant to                                            reference
================  ==========  ======================================================  =====================
``svcca``         [0, 1]      invertible linear maps after the SVD step, offsets      Raghu et al. 2017
``pwcca``         [0, 1]      rotations, isotropic scaling, offsets                   Morcos et al. 2018
``procrustes``    [0, 1]      rotations/reflections, isotropic scaling, offsets       Ding et al. 2021;
                                                                                      Williams et al. 2021
``rsa``           [-1, 1]     rotations, isotropic scaling, offsets (euclidean RDM)   Kriegeskorte et al. 2008
``cycle_knn``     [0, 1]      whatever the neighbour preprocessing is invariant to    Huh et al. 2024
``matching``      [0, 1]      rotations, isotropic scaling, offsets                   Maniparambil et al. 2024
================  ==========  ======================================================  =====================

Chance levels: independent embeddings give svcca/pwcca about sqrt(k/n)-sized correlations (CCA over-fits
when the kept dimensions k approach n; both refuse 2 (kx + ky) > n), procrustes about sqrt(d/n),
rsa about 0, cycle_knn about k^2/n, matching about 1/n. The permutation nulls of
:mod:`pairscout.metrics.stats` calibrate any of them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from pairscout.errors import MetricError
from pairscout.metrics.knn import Preprocess, nearest_neighbours
from pairscout.metrics.validate import ArrayLike, as_matrix, check_not_constant, check_same_rows

F64 = torch.float64


_SIDES: dict[tuple, tuple] | None = None
"""Inside :func:`shared_sides`: each input's centred copy and thin SVD, computed once however many pairs it is in."""


@contextmanager
def shared_sides() -> Iterator[None]:
    """Within this block SVCCA, PWCCA and Procrustes compute each input tensor's centred copy and thin SVD once and
    reuse them for every pair the tensor is in (a probe of every pair of 7 x 6 encoders: 13 SVDs per measure, not 84).
    The same values as without it: the cache holds the inputs themselves (no freed memory can alias an entry) and is
    dropped when the block ends."""
    global _SIDES
    prev, _SIDES = _SIDES, {}
    try:
        yield
    finally:
        _SIDES = prev


def _side_svd(x: ArrayLike, xt: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(xc, u, s)``: the centred copy of ``xt`` (:func:`_centred`) and its thin SVD, memoised per input in
    :func:`shared_sides`."""
    key = None
    if _SIDES is not None and isinstance(x, torch.Tensor):
        key = (id(x), x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, str(x.device), x._version)
        hit = _SIDES.get(key)
        if hit is not None:
            return hit[1:]
    xc = _centred(xt, name)
    u, s, _ = torch.linalg.svd(xc, full_matrices=False)
    if key is not None:
        _SIDES[key] = (x, xc, u, s)  # x itself is kept: its memory cannot be reused by another tensor while cached
    return xc, u, s


def _pair(x: ArrayLike, y: ArrayLike, min_rows: int, why: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    xt = as_matrix(x, "x")
    yt = as_matrix(y, "y", device=xt.device)
    n = check_same_rows({"x": [xt], "y": [yt]}, min_rows=min_rows, why=why)
    return xt, yt, n


def _centred(x: torch.Tensor, name: str) -> torch.Tensor:
    """Column-centred float64 copy, scaled by its largest |value| first (so 1e-20 or 1e20 data is exact).

    Raises:
        MetricError: every column is constant.
    """
    x = x.to(F64)
    x = x - x.mean(0)
    scale = float(x.abs().max())
    if scale == 0.0:
        raise MetricError(f"{name} has constant features (every column has zero variance).",
                          fix="drop that model or check that its encoder produced real embeddings.")
    return x / scale


def _svd_basis(x: torch.Tensor, keep: float, name: str, usv: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors (n, k) and singular values of centred x, keeping the leading directions that
    explain ``keep`` of the variance (SVCCA's first step). Directions below 1e-10 of the largest are rank noise.
    ``usv``: x's thin SVD ``(u, s)`` when already computed."""
    u, s = usv if usv is not None else torch.linalg.svd(x, full_matrices=False)[:2]
    s2 = s.square()
    s2 = torch.where(s > 1e-10 * s[0], s2, torch.zeros_like(s2))
    frac = torch.cumsum(s2, 0) / s2.sum()
    k = int(torch.searchsorted(frac, torch.tensor(keep, dtype=F64, device=frac.device) - 1e-12)) + 1
    k = min(k, int((s2 > 0).sum()))
    return u[:, :k], s[:k]


def _check_keep(keep: float) -> None:
    if not (isinstance(keep, int | float) and 0 < keep <= 1):
        raise MetricError(f"keep={keep!r} must be a fraction of variance in (0, 1].", fix="use keep=0.99 (SVCCA).")


def _cca(x: ArrayLike, y: ArrayLike, keep: float, max_dims: int | str | None, what: str):
    _check_keep(keep)
    if max_dims != "auto" and max_dims is not None and (
            isinstance(max_dims, bool) or not isinstance(max_dims, int) or max_dims < 1):
        raise MetricError(f"max_dims={max_dims!r} must be a positive int, 'auto' or None.", fix="use e.g. max_dims=10.")
    xt, yt, n = _pair(x, y, 4, what)
    if max_dims == "auto":
        max_dims = max(1, n // 10)
    xc, ux0, sx0 = _side_svd(x, xt, "x")
    yc, uy0, sy0 = _side_svd(y, yt, "y")
    ux, _ = _svd_basis(xc, keep, "x", (ux0, sx0))
    uy, _ = _svd_basis(yc, keep, "y", (uy0, sy0))
    if max_dims is not None:
        ux, uy = ux[:, :max_dims], uy[:, :max_dims]
    kx, ky = ux.shape[1], uy.shape[1]
    if 2 * (kx + ky) > n:
        raise MetricError(f"{what} keeps {kx} + {ky} directions of x and y for only {n} rows; CCA then over-fits "
                          "(every correlation tends to 1).",
                          fix=f"use at least {2 * (kx + ky)} rows, or cap the directions with max_dims= "
                              f"(at most {max(1, n // 4)} here).")
    # canonical correlations = singular values of Ux^T Uy (orthonormal bases of the two kept subspaces)
    a, rho, bt = torch.linalg.svd(ux.T @ uy, full_matrices=False)
    return xc, ux, a, rho.clamp(0.0, 1.0)


def svcca(x: ArrayLike, y: ArrayLike, keep: float = 0.99, max_dims: int | str | None = "auto") -> float:
    """SVCCA (Raghu et al. 2017): mean canonical correlation after reducing each side by SVD.

    ``x, y`` are column-centred; each keeps its leading singular directions that explain ``keep`` of its
    variance (0.99 in the paper), at most ``max_dims`` of them (``"auto"``: n // 10, so that CCA cannot
    over-fit; platonic-rep keeps 10; None: no cap, and an error if 2 (kx + ky) > n); the canonical correlations ``rho_1 >= ... >= rho_m`` (m = min(kx, ky)) are the
    singular values of ``Ux^T Uy`` for orthonormal bases Ux, Uy of the kept subspaces; SVCCA = mean(rho).

    Range [0, 1]; 1 when one space is an invertible linear map of the other.

    Raises:
        MetricError: too few rows for the kept dimensions (CCA over-fits), constant features, bad ``keep``.
    """
    _, _, _, rho = _cca(x, y, keep, max_dims, "SVCCA")
    return float(rho.mean())


def pwcca(x: ArrayLike, y: ArrayLike, keep: float = 0.99, max_dims: int | str | None = "auto") -> float:
    """Projection-weighted CCA (Morcos et al. 2018): canonical correlations weighted by how much of x they carry.

    With canonical variates ``h_i = Ux a_i`` (unit n-vectors) of x from the SVCCA step, the weight of
    correlation i is ``alpha_i = sum_j |<h_i, x_j>|`` over the centred columns x_j of x, normalised to sum 1;
    PWCCA = sum_i alpha_i rho_i. Not symmetric in x and y (x is the reference side, as in the paper).

    Range [0, 1].
    """
    xc, ux, a, rho = _cca(x, y, keep, max_dims, "PWCCA")
    h = ux @ a  # (n, m) canonical variates of x
    alpha = (h.T @ xc).abs().sum(1)
    alpha = alpha / alpha.sum()
    return float((alpha * rho).sum())


def procrustes(x: ArrayLike, y: ArrayLike) -> float:
    """Orthogonal Procrustes similarity ``||Xn^T Yn||_*`` (nuclear norm) of centred, unit-Frobenius x and y.

    The Procrustes distance is ``min_Q ||Xn - Yn Q||_F = sqrt(2 - 2 ||Xn^T Yn||_*)`` over orthogonal Q (zero-padding
    the narrower side; Ding et al. 2021, Williams et al. 2021); the similarity reported is ``1 - d^2 / 2``.
    Computed from thin SVDs, ``||Xn^T Yn||_* = ||Sx Ux^T Uy Sy||_*``, so no d1 x d2 matrix is formed.

    Range [0, 1]; 1 iff y is a rotation/reflection of x up to scale and offset.
    """
    xt, yt, _ = _pair(x, y, 2, "Procrustes similarity")
    xc, ux, sx = _side_svd(x, xt, "x")
    yc, uy, sy = _side_svd(y, yt, "y")
    sx, sy = sx / torch.linalg.norm(xc), sy / torch.linalg.norm(yc)  # the SVD of xc / ||xc||: same u, scaled s
    core = (sx[:, None] * (ux.T @ uy)) * sy[None, :]
    return float(torch.linalg.svdvals(core).sum().clamp(0.0, 1.0))


def _rdm(x: torch.Tensor, distance: str) -> torch.Tensor:
    """Upper triangle (i < j) of the representational dissimilarity matrix, float64."""
    if distance == "euclidean":
        d = torch.cdist(x, x)
    elif distance == "cosine":
        z = torch.nn.functional.normalize(x, dim=1)
        d = 1 - z @ z.T
    elif distance == "correlation":
        z = x - x.mean(1, keepdim=True)
        z = torch.nn.functional.normalize(z, dim=1)
        d = 1 - z @ z.T
    else:
        raise MetricError(f"unknown RDM distance {distance!r}.", fix="use 'euclidean', 'cosine' or 'correlation'.")
    iu = torch.triu_indices(x.shape[0], x.shape[0], 1, device=x.device)
    return d[iu[0], iu[1]]


def _rankdata(v: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share their mean rank, as scipy.stats.rankdata)."""
    order = torch.argsort(v, stable=True)
    sv = v[order]
    n = v.numel()
    new = torch.ones(n, dtype=torch.bool, device=v.device)
    new[1:] = sv[1:] != sv[:-1]
    group = torch.cumsum(new.long(), 0) - 1
    starts = torch.nonzero(new).flatten()
    ends = torch.cat([starts[1:], torch.tensor([n], device=v.device)])
    avg = (starts + ends - 1).to(F64) / 2 + 1
    ranks = torch.empty(n, dtype=F64, device=v.device)
    ranks[order] = avg[group]
    return ranks


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = float(torch.linalg.norm(a) * torch.linalg.norm(b))
    if den == 0.0:
        raise MetricError("an RDM is constant (all rows equidistant), so its correlation is undefined.",
                          fix="check for constant or duplicated embeddings.")
    return float((a * b).sum()) / den


def rsa(x: ArrayLike, y: ArrayLike, distance: str = "euclidean", method: str = "spearman",
        max_rows: int | None = 2000, seed: int = 0) -> float:
    """Representational similarity analysis: correlation of the two RDMs' upper triangles (Kriegeskorte 2008).

    RDM entries are pairwise ``distance``s between rows (``euclidean`` (default: invariant to rotations,
    offsets and isotropic scaling), ``cosine`` or ``correlation``); ``method`` is ``spearman`` (rank correlation,
    ties averaged; the usual choice) or ``pearson``. Above ``max_rows`` rows the RDMs are built on that many
    rows drawn without replacement with ``seed`` (the RDM has n(n-1)/2 entries); ``max_rows=None`` uses all.

    Range [-1, 1].
    """
    if method not in ("spearman", "pearson"):
        raise MetricError(f"unknown RSA method {method!r}.", fix="use 'spearman' or 'pearson'.")
    if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 3):
        raise MetricError(f"max_rows={max_rows!r} must be an int >= 3 or None.", fix="use e.g. 2000.")
    xt, yt, n = _pair(x, y, 3, "RSA")
    if max_rows is not None and n > max_rows:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_rows].to(xt.device)
        xt, yt = xt[idx], yt[idx]
    a, b = _rdm(_centred(xt, "x"), distance), _rdm(_centred(yt, "y"), distance)
    if method == "spearman":
        a, b = _rankdata(a), _rankdata(b)
    return _pearson(a, b)


def cycle_knn(x: ArrayLike, y: ArrayLike, k: int = 10, preprocess: Preprocess = Preprocess()) -> float:
    """Cycle k-NN (platonic-rep): the fraction of rows i that a y-then-x neighbour cycle leads back to.

    ``N_x``, ``N_y``: k nearest neighbours by inner product of the preprocessed rows (self excluded; the tie rule
    of :func:`~pairscout.metrics.knn.nearest_neighbours`). Row i counts if ``i in N_x(j)`` for some
    ``j in N_y(i)``. Range [0, 1]; independent spaces give about k^2 / n.
    """
    xt, yt, n = _pair(x, y, 3, "cycle k-NN")
    check_not_constant([xt, yt], ["x", "y"], "a neighbourhood (every row is every row's nearest neighbour)")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n - 1:
        raise MetricError(f"k={k!r} neighbours with {n} rows.", fix=f"use an integer 1 <= k <= {n - 1}.")
    # scaled to max |value| 1 first: neighbours do not depend on scale, and 1e-20-sized rows then normalise
    nx = nearest_neighbours(xt / xt.abs().max().clamp_min(torch.finfo(xt.dtype).tiny), k, preprocess).indices
    ny = nearest_neighbours(yt / yt.abs().max().clamp_min(torch.finfo(yt.dtype).tiny), k, preprocess).indices
    # with tied neighbours the lists hold every tied candidate, padded with -1: padding in N_x never matches,
    # padding in N_y points at i itself, whose own list never holds i (self excluded)
    rows = torch.arange(n, device=nx.device)
    nx = torch.where(nx >= 0, nx, torch.full_like(nx, n))
    ny = torch.where(ny >= 0, ny, rows[:, None].expand_as(ny))
    back = nx[ny]  # (n, k, k): x-neighbours of each y-neighbour of i
    hit = (back == torch.arange(n, device=back.device)[:, None, None]).flatten(1).any(1)
    return float(hit.to(F64).mean())


def _signatures(g: np.ndarray) -> np.ndarray:
    """Each row's similarities to the other rows, sorted: a description of a row that no relabelling changes."""
    off = g.copy()
    np.fill_diagonal(off, np.nan)
    return np.sort(off, axis=1)[:, :-1]  # NaN (the diagonal) sorts last and is dropped


def matching(x: ArrayLike, y: ArrayLike, max_rows: int = 200, repeats: int = 3, seed: int = 0,
             max_iter: int = 30) -> float:
    """Training-free matching accuracy: recover the pairing of rows from the two similarity structures alone.

    Maniparambil et al. 2024 ("Do vision and language encoders represent the world similarly?") match images
    to captions without any training by a quadratic assignment problem (QAP) between the two kernel matrices,
    and report that the accuracy rises with CKA. Here: rows are centred and L2-normalised; the captions' rows
    are shuffled by a random permutation; ``max_P tr(K P L P^T)`` (K, L the cosine Gram matrices) is solved
    approximately: a linear assignment (``scipy.optimize.linear_sum_assignment``) between the rows' sorted
    similarity profiles gives the start, which scipy's FAQ algorithm (``quadratic_assignment``) refines;
    the better of the two by the QAP objective is kept (neither step sees the true pairing). The score is
    the fraction of rows mapped to their own partner. QAP is O(m^3) per iteration, so each of ``repeats``
    draws uses at most ``max_rows`` rows m (seeded) and the mean accuracy is returned.

    Range [0, 1]; chance is 1/m.
    """
    from scipy.optimize import linear_sum_assignment, quadratic_assignment

    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 3:
        raise MetricError(f"max_rows={max_rows!r} must be an int >= 3.", fix="use e.g. 200.")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise MetricError(f"repeats={repeats!r} must be an int >= 1.", fix="use e.g. 3.")
    xt, yt, n = _pair(x, y, 3, "matching accuracy")
    xn = torch.nn.functional.normalize(_centred(xt, "x"), dim=1).cpu().numpy()
    yn = torch.nn.functional.normalize(_centred(yt, "y"), dim=1).cpu().numpy()
    rng = np.random.default_rng(seed)
    m = min(n, max_rows)
    accs = []
    for _ in range(repeats):
        rows = np.sort(rng.choice(n, size=m, replace=False)) if n > m else np.arange(n)
        shuffle = rng.permutation(m)
        k = xn[rows] @ xn[rows].T
        lb = yn[rows][shuffle]
        l_mat = lb @ lb.T
        sx, sy = _signatures(k), _signatures(l_mat)
        cost = (sx**2).sum(1)[:, None] + (sy**2).sum(1)[None, :] - 2 * sx @ sy.T
        _, start = linear_sum_assignment(cost)

        def objective(perm: np.ndarray, k: np.ndarray = k, l_mat: np.ndarray = l_mat) -> float:
            return float((k * l_mat[perm][:, perm]).sum())

        p0 = np.zeros((m, m))
        p0[np.arange(m), start] = 1.0
        res = quadratic_assignment(k, l_mat, method="faq",
                                   options={"maximize": True, "P0": p0, "maxiter": max_iter})
        best = res.col_ind if objective(res.col_ind) >= objective(start) else start
        # node i of K is matched to node best[i] of L, i.e. original row shuffle[best[i]]: right iff that is i
        accs.append(float(np.mean(shuffle[best] == np.arange(m))))
    return float(np.mean(accs))


def chance_level(name: str, n: int, k: int = 10, max_rows: int = 200) -> float | None:
    """The expected value of a measure on independent embeddings where it has a closed form, else None."""
    if name == "matching":
        return 1.0 / min(n, max_rows)
    if name == "cycle_knn":
        return 1.0 - math.exp(-k * k / max(n - 1, 1))
    return None


def all_pairs(fn):
    """``f(xs, ys, **opts) -> (m, t) float64`` from a single-pair measure (a loop: these have no shared work)."""

    def run(xs: ArrayLike | Sequence[ArrayLike], ys: ArrayLike | Sequence[ArrayLike], **opts) -> torch.Tensor:
        xl = [xs] if isinstance(xs, torch.Tensor | np.ndarray) else list(xs)
        yl = [ys] if isinstance(ys, torch.Tensor | np.ndarray) else list(ys)
        return torch.tensor([[fn(x, y, **opts) for y in yl] for x in xl], dtype=F64)

    run.__name__ = run.__qualname__ = f"all_pairs_{fn.__name__}"
    return run
