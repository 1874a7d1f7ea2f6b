"""One vision x text pair's cached embeddings, split into train and held-out parts.

Probe and align both start here: a :class:`PairSource` says which encoders a run used (by name),
on which dataset and with which cache; :func:`pair_data` loads one pair's embeddings from that
cache and splits them with the dataset's fixed-seed (label-stratified) split. A pair that is not
cached is a one-line :class:`~pairscout.errors.CacheError` naming the command that makes it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pairscout.align.evaluate import TEMPLATES, EvalSet
from pairscout.embeddings.cache import EmbeddingCache, Embeddings
from pairscout.errors import CacheError, DataError, PairscoutError
from pairscout.zoo.spec import EncoderSpec

log = logging.getLogger(__name__)


@dataclass
class PairSource:
    """The encoders (by display name), the dataset and the cache a probe or an alignment reads."""

    vision: dict[str, EncoderSpec]
    text: dict[str, EncoderSpec]
    dataset: Any
    """A :class:`~pairscout.data.PairedDataset` (its fingerprint keys the cache)."""
    cache: EmbeddingCache
    rank: Any = None
    """The :class:`~pairscout.ranking.RankResult` the pairs come from, if any."""
    run_dir: Path | None = None
    encode_missing: bool = False
    """Encode (through the cache) what is missing, instead of raising :class:`CacheError`."""
    data_arg: str = ""
    """How to name the dataset on a command line (for messages)."""
    device: torch.device | None = None
    """Where missing embeddings are encoded: the user's ``--device`` as :func:`pairscout.runtime.pick_device` resolved
    it when the source was made (:func:`source_from_rank`, :func:`source_from_zoos`); None: ``auto`` when encoding."""

    def spec(self, name: str, modality: str) -> EncoderSpec:
        table = self.vision if modality == "vision" else self.text
        if name in table:
            return table[name]
        for spec in table.values():  # an id works too
            if spec.id == name:
                return spec
        raise PairscoutError(f"{modality} encoder {name!r} is not part of this run.",
                             fix=f"use one of {', '.join(table)}.")  # fmt: skip

    def chosen_layers(self, vision: str, text: str) -> tuple[str, str]:
        """The (vision, text) layers the rank run's layer sweep chose for this pair (``final`` without a sweep)."""
        pairs = getattr(self.rank, "pairs", None)
        if pairs is None or "vision_layer" not in pairs:
            return "final", "final"
        row = pairs[(pairs["vision"] == vision) & (pairs["text"] == text)]
        if row.empty:
            return "final", "final"
        return str(row["vision_layer"].iloc[0]), str(row["text_layer"].iloc[0])

    def command_for(self, vision: EncoderSpec, text: EncoderSpec, tokens: bool = False) -> str:
        cmd = f"pairscout encode --vision-zoo {vision.id} --text-zoo {text.id} --data {self.data_arg}"
        if self.cache.root != EmbeddingCache().root:
            cmd += f" --cache-dir {self.cache.root}"
        return cmd + (" --tokens" if tokens else "")


def _data_arg(ds: Any) -> str:
    desc = ds.describe()
    arg = str(desc.get("source", ds.source))
    sel = desc.get("selection")
    if sel and desc.get("format") != "generated":
        arg += f" --n {sel['n']}"
    if desc.get("skip_bad") or desc.get("skipped_lines"):
        arg += " --skip-bad"
    return arg


def source_from_rank(run: Any, *, data: Any = None, cache_dir: str | Path | None = None,
                     device: str | torch.device | None = None, run_dir: str | Path | None = None) -> PairSource:
    """The encoders, dataset and cache of a rank run (a :class:`RankResult` or its folder).

    The dataset is rebuilt from the run's recorded source (or ``data`` when given) and must have the
    run's fingerprint. ``device``: the user's ``--device`` (resolved here, once); ``run_dir``: the folder of an
    in-memory :class:`RankResult` (a folder given as ``run`` is its own).
    """
    from pairscout.data import load_dataset
    from pairscout.ranking import RankResult
    from pairscout.runs import STORE
    from pairscout.runtime import pick_device

    run_dir = Path(run_dir) if run_dir is not None else None
    if not isinstance(run, RankResult):
        run_dir = Path(run)
        run = STORE.rank(run_dir)
    settings = run.meta["settings"]
    specs = [EncoderSpec.from_dict(d, where="rank.json") for z in ("vision_zoo", "text_zoo") for d in settings[z]["encoders"]]
    expected = settings["dataset_fingerprint"]
    desc = run.meta.get("dataset", {})
    if data is not None and not isinstance(data, str | Path):
        ds = data
    else:
        where = str(data if data is not None else desc.get("source", ""))
        try:
            cols = desc.get("columns") or {}  # the columns the run read (manifests, Hugging Face datasets)
            # a --skip-bad run (bad images or malformed manifest lines skipped): the same rows are skipped again
            skip_bad = bool(desc.get("skip_bad") or desc.get("skipped_lines"))
            ds = load_dataset(where, image_column=cols.get("image"), caption_column=cols.get("caption"),
                              label_column=cols.get("label"), skip_bad=skip_bad)
            if (ds.fingerprint != expected or skip_bad) and desc.get("selection"):
                ds = ds.subset(int(desc["selection"]["n"]), seed=int(settings.get("seed", 0)))
            if skip_bad:
                from pairscout.resolve import drop_bad_images

                ds, _ = drop_bad_images(ds)
        except DataError as e:
            reason = str(e).split(" Fix: ", 1)[0]  # its own fix names rank's options (--skip-bad), not this command's
            raise DataError(f"the dataset of the rank run ({where}) cannot be read: {reason}",
                            fix="restore the data as it was when it was ranked, or pass --data with the dataset the run ranked.") from None  # fmt: skip
    if ds.fingerprint != expected:
        raise DataError(f"the dataset {ds.source} (fingerprint {ds.fingerprint[:12]}) is not the one the rank run used ({expected[:12]}).",
                        fix="pass --data (and --n / --seed) exactly as given to `pairscout rank`.")  # fmt: skip
    return PairSource(
        vision={s.name: s for s in specs if s.modality == "vision" and s.name in set(run.pairs["vision"])},
        text={s.name: s for s in specs if s.modality == "text" and s.name in set(run.pairs["text"])},
        dataset=ds, cache=EmbeddingCache(cache_dir), rank=run, run_dir=run_dir, data_arg=_data_arg(ds),
        device=pick_device(device),
    )  # fmt: skip


def source_from_zoos(vision_zoo: Any, text_zoo: Any, data: Any, *, n: int | None = None, seed: int = 0,
                     cache_dir: str | Path | None = None, device: str | torch.device | None = None) -> PairSource:  # fmt: skip
    """Encoders of two zoos on a dataset; missing embeddings are encoded (and cached) on demand, on ``device`` (the
    user's ``--device``, resolved here once)."""
    from pairscout.resolve import resolve_data, resolve_zoos
    from pairscout.runtime import pick_device

    vz, tz = resolve_zoos(vision_zoo, text_zoo)
    ds = resolve_data(data, n=n, seed=seed)
    return PairSource(vision={s.name: s for s in vz.encoders}, text={s.name: s for s in tz.encoders}, dataset=ds,
                      cache=EmbeddingCache(cache_dir), encode_missing=True, data_arg=_data_arg(ds),
                      device=pick_device(device))  # fmt: skip


def load_embeddings(src: PairSource, spec: EncoderSpec, *, tokens: bool = False, partner: EncoderSpec | None = None) -> Embeddings:
    """A model's cached embeddings of the source's dataset (fp32 entry first, then bf16)."""
    fp = src.dataset.fingerprint
    from pairscout.runs import STORE

    for precision in ("fp32", "bf16"):
        hit = STORE.embeddings(src.cache, spec, fp, precision=precision, tokens=tokens)  # read once per process
        if hit is not None:
            return hit
    if src.encode_missing:
        from pairscout.embeddings.runner import EncodeSettings, encode

        return encode(spec, src.dataset, cache=src.cache, settings=EncodeSettings(tokens=tokens, device=None if src.device is None else str(src.device)))
    pair = (spec, partner) if spec.modality == "vision" else (partner, spec)
    v, t = (p or spec for p in pair)
    what = "token features" if tokens and src.cache.load(spec, fp) is not None else "embeddings"
    raise CacheError(f"no cached {what} of {spec.id} for dataset {src.dataset.name} (fingerprint {fp[:12]}) in {src.cache.root}.",
                     fix=f"run `{src.command_for(v, t, tokens)}` first (`pairscout rank` with the same zoos, data and cache makes them too).")  # fmt: skip


def split_pair(v: Embeddings, t: Embeddings, rows: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor | None]]:
    """Image features, caption features, caption -> image (renumbered) and tokens of the given image rows."""
    rows = torch.as_tensor(rows, dtype=torch.long)
    n = v.pooled.shape[0]
    remap = torch.full((n,), -1, dtype=torch.long)
    remap[rows] = torch.arange(len(rows))
    keep = remap[t.row_index] >= 0
    cap_rows = torch.nonzero(keep).flatten()
    toks = {
        "vision_tokens": None if v.tokens is None else v.tokens[rows],
        "vision_token_mask": None if v.token_mask is None else v.token_mask[rows],
        "text_tokens": None if t.tokens is None else t.tokens[cap_rows],
        "text_token_mask": None if t.token_mask is None else t.token_mask[cap_rows],
    }
    return v.pooled[rows], t.pooled[cap_rows], remap[t.row_index[cap_rows]], toks


@dataclass
class PairData:
    """One pair's train part and held-out :class:`EvalSet`."""

    vision_spec: EncoderSpec
    text_spec: EncoderSpec
    vision: Tensor
    text: Tensor
    text_image_index: Tensor
    eval: EvalSet
    train_rows: Tensor
    test_rows: Tensor
    dataset_fingerprint: str
    tokens: dict[str, Tensor | None] = field(default_factory=dict)
    corpus: list[str] = field(default_factory=list)
    """Every caption of the dataset: the corpus the cache fitted a corpus-fitted text encoder (TF-IDF) on."""
    text_encoder: Any = None
    """The text encoder built (and fitted on ``corpus``) for the class prompts, or None."""
    text_keys: Tensor | None = None
    """(M_train,) key per training caption: caption-text id, or the class label with ``class_level``."""
    vision_layer: str = "final"
    """The vision view the features come from: ``final`` or the block a layer sweep chose."""
    text_layer: str = "final"


def encode_class_prompts(spec: EncoderSpec, classnames: Sequence[str], templates: Sequence[str] = TEMPLATES, *,
                         fit_texts: Sequence[str] | None = None, tokens: bool = False, encoder: Any = None,
                         layer: str | None = None):  # fmt: skip
    """(C, P, d) text-encoder features of every class name in every template, and the encoder used.

    A text encoder fitted on its corpus (TF-IDF) is fitted on ``fit_texts`` first: the same corpus the
    cached caption embeddings were fitted on, so the prompts land in the same feature space.
    Returns ``(prompts, tokens or None, mask or None, encoder)``; tokens are (C * P, T, d).
    """
    from pairscout.encoders import build_encoder

    enc = encoder or build_encoder(spec)
    if encoder is None:
        enc.fit(list(fit_texts or []))
    texts = [tpl.format(c=c) for c in classnames for tpl in templates]
    with torch.inference_mode():
        out = enc.encode_texts(texts, tokens=tokens)
    c, p = len(classnames), len(templates)
    feats = out.pooled if layer in (None, "final") else out.layers[layer]  # a layer sweep's chosen block
    pooled = feats.detach().float().cpu().reshape(c, p, -1).clone()
    tok = None if out.tokens is None else out.tokens.detach().float().cpu().clone()
    mask = None if out.token_mask is None else out.token_mask.detach().cpu().clone()
    return pooled, tok, mask, enc


def fits_on_corpus(encoder: Any) -> bool:
    """True for encoders whose features depend on a corpus they are fitted on (TF-IDF)."""
    from pairscout.encoders.base import Encoder

    return type(encoder).fit is not Encoder.fit


def pair_data(src: PairSource, vision: str, text: str, *, test_fraction: float = 0.2, seed: int = 0, tokens: bool = False,
              zero_shot: bool = False, templates: Sequence[str] = TEMPLATES, class_level: bool = False) -> PairData:  # fmt: skip
    """Load a pair's embeddings from the cache and split them (train / held-out) with a fixed seed.

    Args:
        src: where the encoders, data and cache are.
        vision, text: encoder names (or ids) of the pair.
        test_fraction, seed: the dataset's label-stratified split (:meth:`PairedDataset.split`).
        tokens: also load token features (the ``local_global`` head).
        zero_shot: embed the class names through ``templates`` with the text encoder (needs labels).
        class_level: training keys are the class labels (same-class captions are positives), not caption texts.
    """
    vs, ts = src.spec(vision, "vision"), src.spec(text, "text")
    vl, tl = src.chosen_layers(vs.name, ts.name)
    if tokens and (vl, tl) != ("final", "final"):
        raise PairscoutError(f"the layer sweep chose layers {vl} / {tl} for {vs.name} x {ts.name}, but token features "
                             "(the local_global head) exist for the final layer only.",
                             fix="use another --head, or rank without --layers.")
    v = load_embeddings(src, vs, tokens=tokens, partner=ts).layer(vl)
    t = load_embeddings(src, ts, tokens=tokens, partner=vs).layer(tl)
    ds = src.dataset
    train_rows, test_rows = (torch.from_numpy(a) for a in ds.split(test_fraction, seed))
    xv, xt, idx, toks = split_pair(v, t, train_rows)
    ev, et, eidx, etoks = split_pair(v, t, test_rows)
    labels = None if ds.labels is None else torch.from_numpy(ds.labels)[test_rows]
    corpus = ds.flat_captions()[0]
    keys = caption_keys(corpus) if len(corpus) == t.pooled.shape[0] else None
    eval_keys = train_keys = None
    if keys is not None:
        eval_keys = keys[_caption_rows(t, test_rows, v.pooled.shape[0])]
        train_keys = keys[_caption_rows(t, train_rows, v.pooled.shape[0])]
    if class_level and ds.labels is not None:
        train_keys = torch.from_numpy(ds.labels)[train_rows][idx]
    eval_set = EvalSet(ev, et, eidx, labels=labels, text_keys=eval_keys, **etoks)
    enc = None
    if zero_shot and ds.labels is not None and ds.classnames:
        prompts, ptok, pmask, enc = encode_class_prompts(ts, ds.classnames, templates, fit_texts=corpus, tokens=tokens, layer=tl)
        eval_set.class_prompts, eval_set.class_prompt_tokens, eval_set.class_prompt_token_mask = prompts, ptok, pmask
    return PairData(vision_spec=vs, text_spec=ts, vision=xv, text=xt, text_image_index=idx, eval=eval_set,
                    train_rows=train_rows, test_rows=test_rows, dataset_fingerprint=ds.fingerprint, tokens=toks,
                    corpus=corpus, text_encoder=enc, text_keys=train_keys, vision_layer=vl, text_layer=tl)  # fmt: skip


def caption_keys(captions: Sequence[str]) -> Tensor:
    """(M,) int64 id per caption: identical texts (after stripping and case-folding) share an id."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(" ".join(c.split()).casefold(), len(ids)) for c in captions], dtype=torch.long)


def _caption_rows(t: Embeddings, rows: Tensor, n: int) -> Tensor:
    """Caption indices (into the cached text embeddings) of the given image rows, in split_pair's order."""
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.as_tensor(rows, dtype=torch.long)] = True
    return torch.nonzero(keep[t.row_index]).flatten()
