"""The aligned model: two frozen encoders + their trained heads, usable on raw images and texts.

:func:`align` trains the heads of one pair on its cached embeddings and returns an
:class:`AlignedModel`; :meth:`AlignedModel.save` writes a folder that :meth:`AlignedModel.load`
rebuilds from the encoders' specs::

    <dir>/heads.safetensors    vision.*, text.*, loss.* (the learned scale and bias)
    <dir>/config.json          encoder specs, head configs, loss, dataset fingerprint, training config, metrics
    <dir>/fit_texts.json       only for corpus-fitted text encoders (TF-IDF): the corpus to refit on

Every file is written atomically; ``config.json`` is written last, so a folder with it is complete.

Example:
    >>> model = AlignedModel.load("runs/demo/align/efficientnet-lite2__all-MiniLM-L6-v2")  # doctest: +SKIP
    >>> model.zero_shot(["cat.jpg"], ["cat", "dog"]).top[0]
    [('cat', 0.93), ('dog', 0.07)]
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from pairscout.align.checkpoints import CKPT_DIR, load_head_state, save_heads
from pairscout.align.evaluate import TEMPLATES, class_embeddings
from pairscout.align.heads import HeadConfig, build_head
from pairscout.align.train import TrainConfig, TrainResult, train
from pairscout.errors import DataError, PairscoutError
from pairscout.files import atomic_write_text
from pairscout.provenance import provenance
from pairscout.zoo.spec import EncoderSpec

log = logging.getLogger(__name__)

CONFIG, WEIGHTS, FIT_TEXTS = "config.json", "heads.safetensors", "fit_texts.json"
FORMAT = 1


@dataclass
class ZeroShotPrediction:
    """Zero-shot output: ``probs`` (N, C) softmax over the given classes (scaled by the learned t)."""

    probs: Tensor
    classnames: list[str]
    top: list[list[tuple[str, float]]]
    """Per image, the top-k (class, probability), best first."""


def indistinct(class_emb: Tensor, classnames: Sequence[str], tol: float = 1e-6) -> list[str]:
    """The class names whose embeddings equal another class's (cosine within ``tol`` of 1), in order."""
    e = F.normalize(class_emb.float(), dim=-1)
    sim = e @ e.T
    sim.fill_diagonal_(-1.0)
    return [c for c, hit in zip(classnames, (sim > 1 - tol).any(1).tolist(), strict=True) if hit]


class AlignedModel:
    """Frozen vision and text encoders with trained projector heads into one shared space."""

    def __init__(self, vision_spec: EncoderSpec, text_spec: EncoderSpec, vision_head: nn.Module, text_head: nn.Module, *,
                 scale: float, bias: float | None = None, meta: dict[str, Any] | None = None,
                 fit_texts: Sequence[str] | None = None, vision_encoder: Any = None, text_encoder: Any = None,
                 device: str | torch.device = "cpu") -> None:  # fmt: skip
        self.vision_spec, self.text_spec = vision_spec, text_spec
        self.device = torch.device(device)
        self.vision_head, self.text_head = vision_head.to(self.device).eval(), text_head.to(self.device).eval()
        self.scale, self.bias = float(scale), None if bias is None else float(bias)
        self.meta = dict(meta or {})
        self.fit_texts = None if fit_texts is None else list(fit_texts)
        self._vision_encoder, self._text_encoder = vision_encoder, text_encoder

    def __repr__(self) -> str:
        return (f"AlignedModel({self.vision_spec.shown} [{self.vision_head.config.kind}] x {self.text_spec.shown} "
                f"[{self.text_head.config.kind}] -> {self.dim}-d)")  # fmt: skip

    @property
    def dim(self) -> int:
        return int(self.vision_head.config.out_dim)

    # --- encoders (built lazily from their specs) ----------------------------------------------
    @property
    def vision_encoder(self):
        if self._vision_encoder is None:
            from pairscout.encoders import build_encoder

            self._vision_encoder = build_encoder(self.vision_spec)
        return self._vision_encoder.to(self.device)

    @property
    def text_encoder(self):
        if self._text_encoder is None:
            from pairscout.encoders import build_encoder

            enc = build_encoder(self.text_spec)
            enc.fit(self.fit_texts)
            self._text_encoder = enc
        return self._text_encoder.to(self.device)

    # --- embedding --------------------------------------------------------------------------------
    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image | str | Path], batch_size: int = 32) -> Tensor:
        """(N, dim) L2-normalised embeddings of PIL images or image paths."""
        enc = self.vision_encoder
        transform = enc.image_transform()
        tokens = self.vision_head.config.needs_tokens
        outs = []
        for a in range(0, len(images), batch_size):
            pixels = torch.stack([transform(_open(im)) for im in images[a : a + batch_size]]).to(self.device)
            fmt = torch.channels_last if getattr(enc, "channels_last", False) else torch.contiguous_format
            out = enc.encode_images(pixels.contiguous(memory_format=fmt), tokens=tokens)
            outs.append(self._project(self.vision_head, out, self.layer("vision")))
        return torch.cat(outs) if outs else torch.zeros(0, self.dim)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> Tensor:
        """(N, dim) L2-normalised embeddings of texts."""
        enc = self.text_encoder
        tokens = self.text_head.config.needs_tokens
        outs = [self._project(self.text_head, enc.encode_texts(list(texts[a : a + batch_size]), tokens=tokens), self.layer("text"))
                for a in range(0, len(texts), batch_size)]  # fmt: skip
        return torch.cat(outs) if outs else torch.zeros(0, self.dim)

    def layer(self, side: str) -> str:
        """The encoder layer the ``side`` head was trained on: ``final``, or a block index chosen by a layer sweep."""
        return str((self.meta.get("layers") or {}).get(side, "final"))

    def _project(self, head: nn.Module, out: Any, layer: str = "final") -> Tensor:
        tok = None if out.tokens is None else out.tokens.float().to(self.device)
        mask = None if out.token_mask is None else out.token_mask.to(self.device)
        pooled = out.pooled if layer == "final" else out.layers[layer]
        return F.normalize(head(pooled.float().to(self.device), tok, mask).float(), dim=-1).cpu()

    def embed_classes(self, classnames: Sequence[str], templates: Sequence[str] | None = None) -> Tensor:
        """(C, dim) class embeddings: every template per class, normalised and averaged."""
        templates = _check_templates(templates)
        prompts = self.embed_texts([tpl.format(c=c) for c in classnames for tpl in templates])
        return class_embeddings(prompts.reshape(len(classnames), len(templates), -1))

    def zero_shot(self, images: Sequence[Image.Image | str | Path], classnames: Sequence[str], templates: Sequence[str] | None = None,
                  top_k: int = 5) -> ZeroShotPrediction:  # fmt: skip
        """Classify images among ``classnames`` (prompted with ``templates``, default :data:`TEMPLATES`)."""
        if not classnames:
            raise PairscoutError("zero-shot needs at least one class name.", fix="pass --classes a,b,c.")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise PairscoutError(f"--top-k {top_k!r} is not an integer >= 1.", fix="pass --top-k 1 or more.")
        _check_templates(templates)
        img = self.embed_images(images)
        cls = self.embed_classes(classnames, templates)
        same = indistinct(cls, classnames)
        if same:
            log.warning("the classes %s embed identically through %s (words it does not know, e.g. outside a TF-IDF "
                        "vocabulary): zero-shot cannot tell them apart", ", ".join(repr(c) for c in same), self.text_spec.id)
        probs = torch.softmax(self.scale * img @ cls.T, dim=-1)
        k = min(top_k, len(classnames))
        val, idx = probs.topk(k, dim=-1)
        top = [[(classnames[j], float(p)) for p, j in zip(vr, ir, strict=True)] for vr, ir in zip(val.tolist(), idx.tolist(), strict=True)]
        return ZeroShotPrediction(probs=probs, classnames=list(classnames), top=top)

    def retrieve(self, *, texts: Sequence[str], images: Sequence[Image.Image | str | Path], k: int = 5,
                 direction: str = "t2i") -> tuple[Tensor, Tensor]:  # fmt: skip
        """Top-k cosine matches: ``t2i`` ranks the images for each text, ``i2t`` the texts for each image.

        Returns ``(scores, indices)``, each (queries, k).
        """
        if direction not in ("t2i", "i2t"):
            raise PairscoutError(f"direction {direction!r} is unknown.", fix="use 't2i' or 'i2t'.")
        t, i = self.embed_texts(texts), self.embed_images(images)
        sim = t @ i.T if direction == "t2i" else i @ t.T
        return sim.topk(min(k, sim.shape[1]), dim=-1)

    # --- files ------------------------------------------------------------------------------------
    def save(self, out: str | Path) -> Path:
        """Write the heads (safetensors), the fit corpus if any, then ``config.json`` (atomically, last)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_heads(out / WEIGHTS, self.vision_head, self.text_head)
        if self.fit_texts is not None:
            atomic_write_text(out / FIT_TEXTS, json.dumps(self.fit_texts, ensure_ascii=False))
        config = {
            "kind": "pairscout.aligned_model", "format": FORMAT,
            "vision": self.vision_spec.to_dict(), "text": self.text_spec.to_dict(),
            "vision_head": self.vision_head.config.to_dict(), "text_head": self.text_head.config.to_dict(),
            "loss": {"scale": self.scale, "bias": self.bias},
            "fit_texts": FIT_TEXTS if self.fit_texts is not None else None,
            **{k: v for k, v in self.meta.items() if k not in ("kind", "format")},
        }  # fmt: skip
        atomic_write_text(out / CONFIG, json.dumps(config, indent=2, default=str) + "\n")
        return out

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> AlignedModel:
        """Rebuild the model a :meth:`save` folder holds (encoders from their specs, heads from the weights)."""
        from safetensors.torch import load_file

        path = Path(path)
        cfg_path = path / CONFIG
        if not cfg_path.is_file():
            raise PairscoutError(f"{path} holds no aligned model ({CONFIG} is missing).", fix="point at the --out folder of `pairscout align`.")
        again = "run `pairscout align` again (with --force)."
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            weights = load_file(path / WEIGHTS)
        except Exception as e:  # noqa: BLE001 - JSON, OS and safetensors (SafetensorError) errors alike
            raise PairscoutError(f"the aligned model in {path} is unreadable ({type(e).__name__}: {e}).", fix=again) from None
        if not isinstance(cfg, dict) or cfg.get("kind") != "pairscout.aligned_model" or int(cfg.get("format", 0)) > FORMAT:
            raise PairscoutError(f"{cfg_path} is not an aligned model this pairscout can read.", fix="upgrade pairscout or re-run `pairscout align`.")
        missing = [k for k in ("vision", "text", "vision_head", "text_head", "loss") if k not in cfg]
        if missing:
            raise PairscoutError(f"{cfg_path} lacks {', '.join(missing)}.", fix=again)
        try:
            heads = [build_head(HeadConfig.from_dict(cfg[f"{side}_head"])) for side in ("vision", "text")]
            load_head_state(weights, *heads)
            fit = None
            if cfg.get("fit_texts"):
                fit = json.loads((path / cfg["fit_texts"]).read_text(encoding="utf-8"))
        except PairscoutError:
            raise
        except Exception as e:  # noqa: BLE001 - heads that do not match their weights, a damaged fit_texts file
            raise PairscoutError(f"the aligned model in {path} does not load ({type(e).__name__}: {e}).", fix=again) from None
        meta = {k: v for k, v in cfg.items() if k not in ("vision", "text", "vision_head", "text_head", "loss", "fit_texts")}
        return cls(EncoderSpec.from_dict(cfg["vision"], where=str(cfg_path)), EncoderSpec.from_dict(cfg["text"], where=str(cfg_path)),
                   heads[0], heads[1], scale=cfg["loss"]["scale"], bias=cfg["loss"].get("bias"), meta=meta, fit_texts=fit,
                   device=device)  # fmt: skip


def _check_templates(templates: Sequence[str] | None) -> list[str]:
    """The templates (default :data:`TEMPLATES`); one without ``{c}`` is a one-line error."""
    templates = list(templates or TEMPLATES)
    bad = next((t for t in templates if "{c}" not in t), None)
    if bad is not None:
        raise PairscoutError(f"template {bad!r} has no {{c}}.", fix="put {c} where the class name goes.")
    for t in templates:  # any other field ({x}, {0}, a lone brace) would fail at format time with a traceback
        try:
            t.format(c="class")
        except (KeyError, IndexError, ValueError, AttributeError) as e:
            raise PairscoutError(f"template {t!r} has a placeholder other than {{c}} or a lone brace ({type(e).__name__}: {e}).",
                                 fix="use only {c} (the class name); write a literal brace as {{ or }}.") from None
    return templates


def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """Image files given as files or folders (searched recursively, the dataset readers' extensions)."""
    from pairscout.data.folder import find_images

    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += find_images(p)
        elif p.is_file():
            files.append(p)
        else:
            raise PairscoutError(f"image {p} does not exist.", fix="pass image files or folders.")
    if not files:
        raise PairscoutError("no images given.", fix="pass image files or folders holding .jpg/.png files.")
    return files


def _open(im: Image.Image | str | Path) -> Image.Image:
    """An RGB image through the datasets' one reader (regular files only, size limits, 16-bit scaling)."""
    if isinstance(im, Image.Image):
        return im.convert("RGB")
    from pairscout.data.images import decode_image
    from pairscout.errors import ImageReadError

    try:
        return decode_image(im)
    except ImageReadError as e:
        raise DataError(f"image {im} {e}.", fix="pass a readable image file (at most PIL's pixel limit).") from None


# --- align: train one pair and wrap it as a model -------------------------------------------------
@dataclass
class AlignResult:
    model: AlignedModel
    train: TrainResult
    metrics: dict[str, float] = field(default_factory=dict)
    out: Path | None = None


def default_out(run: str | Path, pair: tuple[str, str] | None = None) -> Path:
    """Where ``pairscout align RUN`` saves the model: ``RUN/align/VISION__TEXT`` (default pair: the run's best).

    The folder name is made safe (:func:`pairscout.files.safe_name`): an ``emb:/abs/path`` encoder, an absolute
    ``hf:`` id or a zoo name ``../../x`` still writes inside ``RUN/align/``."""
    from pairscout.files import safe_name
    from pairscout.runs import STORE

    v, t = pair or STORE.rank(run).recommended()[0]
    return Path(run) / "align" / f"{safe_name(v)}__{safe_name(t)}"


def align(
    pair: tuple[str, str] | None = None,
    *,
    run: Any = None,
    vision_zoo: Any = None,
    text_zoo: Any = None,
    data: Any = None,
    n: int | None = None,
    config: TrainConfig | None = None,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    zero_shot: bool = True,
    templates: Sequence[str] = TEMPLATES,
    cache_dir: str | Path | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    keep_checkpoint: bool = False,
    progress: Any = None,
    command: str | None = None,
) -> AlignResult:
    """Train projector heads for one vision x text pair on its cached embeddings.

    Args:
        pair: (vision, text) encoder names; default: the verdict's pair of ``run`` (``rank.json["verdict"]``).
        run: a rank result or its folder (the pair's embeddings must be cached: a miss names the
            command that makes them). Without it, ``vision_zoo`` / ``text_zoo`` / ``data`` name the
            encoders and data, and missing embeddings are encoded (cached).
        config: the training settings (head, loss, optimiser, steps, ...).
        test_fraction, split_seed: the held-out split (the dataset's label-stratified split).
        zero_shot: also evaluate zero-shot classification when the dataset has labels.
        out: folder for the model (``config.json``, ``heads.safetensors``) and ``train/`` (checkpoints, log).
        resume, force: continue from / discard the checkpoints in ``out/train``.
        keep_checkpoint: keep ``out/train/checkpoints`` once the run has finished (heads + optimiser state,
            about 4x the model's size; needed only to continue this run). Interrupted runs always keep theirs.
    """
    from pairscout.align.pairdata import fits_on_corpus, pair_data, source_from_rank, source_from_zoos

    config = config or TrainConfig()
    if run is not None:
        src = source_from_rank(run, data=data, cache_dir=cache_dir, device=config.device)
    else:
        src = source_from_zoos(vision_zoo or "offline", text_zoo or "offline", data or "generated", n=n, cache_dir=cache_dir,
                               device=config.device)  # missing embeddings are encoded on the user's device
    if pair is None:
        if src.rank is None:
            raise PairscoutError("align needs a pair when there is no rank run.", fix="pass --pair VISION,TEXT or --run DIR.")
        pair = src.rank.recommended()[0]
    tokens = config.head == "local_global"
    data_ = pair_data(src, pair[0], pair[1], test_fraction=test_fraction, seed=split_seed, tokens=tokens, zero_shot=zero_shot, templates=templates)
    out = Path(out) if out is not None else None
    # never overwrite finished work silently (with checkpoints present, train() refuses and says how to resume)
    if out is not None and (out / CONFIG).is_file() and not (out / "train" / CKPT_DIR).exists() and not (force or resume):
        raise PairscoutError(f"{out} already holds an aligned model ({CONFIG}).",
                             fix="choose another --out, or pass --force to train again and replace it.")
    res = train(data_.vision, data_.text, data_.text_image_index, config, out_dir=None if out is None else out / "train",
                eval_data=data_.eval, progress=progress, resume=resume, force=force, caption_keys=data_.text_keys, **data_.tokens)  # fmt: skip
    enc = data_.text_encoder
    if enc is None:
        from pairscout.encoders import build_encoder

        enc = build_encoder(data_.text_spec)
        if fits_on_corpus(enc):
            enc.fit(data_.corpus)
    fit_texts = data_.corpus if fits_on_corpus(enc) else None
    params = res.loss_parameters()
    meta = {
        "dataset_fingerprint": data_.dataset_fingerprint,
        "dataset": src.dataset.describe(),
        "split": {"test_fraction": test_fraction, "seed": split_seed, "n_train": len(data_.train_rows), "n_test": len(data_.test_rows)},
        "train_config": config.to_dict(),
        "metrics": res.metrics,
        "final_loss": res.final_loss,
        "samples_per_s": res.samples_per_s,
        "timings_s": res.timings,
        "rank_run": None if src.run_dir is None else str(src.run_dir),
        "layers": {"vision": data_.vision_layer, "text": data_.text_layer},
        **provenance(command, ("torch",)),
    }  # fmt: skip
    model = AlignedModel(data_.vision_spec.narrowed(data_.vision_layer), data_.text_spec.narrowed(data_.text_layer), res.vision_head.cpu(), res.text_head.cpu(), scale=params["scale"],
                         bias=params.get("bias"), meta=meta, fit_texts=fit_texts, text_encoder=enc)  # fmt: skip
    from pairscout.distributed import is_main

    if out is not None and is_main():  # under torchrun every rank holds the same heads; rank 0 writes them
        model.save(out)
        if not keep_checkpoint:
            import shutil

            shutil.rmtree(out / "train" / CKPT_DIR, ignore_errors=True)
    return AlignResult(model=model, train=res, metrics=res.metrics, out=out)
