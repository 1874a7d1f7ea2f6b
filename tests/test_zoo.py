from __future__ import annotations

import pytest

from pairscout.errors import ZooError
from pairscout.zoo.registry import available_zoos, get_zoo, load_zoo_file, resolve_zoo
from pairscout.zoo.spec import EncoderSpec


def test_shipped_zoos_parse_and_split_by_modality():
    assert {"offline", "offline-large", "standard"} <= set(available_zoos())
    for name in ("offline", "offline-large", "standard"):
        z = get_zoo(name)
        assert z.of("vision") and z.of("text")
        assert all(e.modality == "vision" for e in z.of("vision"))
        assert len({e.name for e in z.encoders}) == len({e.fingerprint() for e in z.encoders}) == len(z.encoders)


def test_offline_large_is_the_offline_zoo_plus_the_dinov2_poolings():
    small, large = get_zoo("offline").encoders, get_zoo("offline-large").encoders
    assert all(e in large for e in small)  # every offline entry, unchanged
    extra = [e for e in large if e not in small]
    assert {(e.id, e.pooling) for e in extra} == {("pack:dinov2-s14-imgfocus", "cls"), ("pack:dinov2-s14-imgfocus", "mean")}
    dino = [e for e in large if e.id == "pack:dinov2-s14-imgfocus"]
    assert sorted(e.pooling for e in dino) == ["cls", "cls+mean", "mean"]
    assert all("possibly fine-tuned" in e.notes for e in dino)
    # one id pooled three ways: the id picks the first entry (offline's), a name picks any
    assert resolve_zoo("pack:dinov2-s14-imgfocus,", "vision").encoders[0].pooling == "cls+mean"
    assert resolve_zoo("dinov2-s-mean,dinov2-s-cls", "vision").encoders[0].pooling == "mean"


def test_resolve_by_name_path_and_ids(tmp_path):
    assert resolve_zoo("offline", "text").of("vision") == ()
    p = tmp_path / "mine.toml"
    p.write_text('name = "mine"\n[[encoder]]\nid = "baseline:random"\nmodality = "text"\nname = "rnd"\noptions = {dim = 8}\n')
    z = resolve_zoo(str(p), "text")
    assert z.name == "mine" and z.encoders[0].options == {"dim": 8} and z.encoders[0].name == "rnd"
    ids = resolve_zoo("baseline:pixels, timm:resnet18.a1_in1k", "vision")
    assert [e.id for e in ids.encoders] == ["baseline:pixels", "timm:resnet18.a1_in1k"]


def test_ids_known_to_a_shipped_zoo_take_its_settings():
    offline = {e.id: e for e in get_zoo("offline").encoders}
    some_id = next(i for i, e in offline.items() if e.modality == "vision")
    assert resolve_zoo(some_id + ",", "vision").encoders[0] == offline[some_id]


@pytest.mark.parametrize(
    ("arg", "modality", "needle"),
    [
        ("nosuchzoo", "vision", "no zoo named 'nosuchzoo'"),
        ("foo:bar", "vision", "unknown source prefix 'foo'"),
        ("", "text", "empty"),
        ("missing.toml", "text", "does not exist"),
    ],
)
def test_bad_zoo_arguments_name_the_problem(arg, modality, needle):
    with pytest.raises(ZooError, match=needle) as ei:
        resolve_zoo(arg, modality)
    assert "\n" not in str(ei.value)


def test_bad_zoo_files(tmp_path):
    cases = {
        "syntax.toml": ("[[encoder]\nid=1", "not valid TOML"),
        "none.toml": ('name = "x"\n', "defines no encoders"),
        "field.toml": ('[[encoder]]\nid = "st:x"\nmodality = "text"\npoolling = "mean"\n', "unknown field"),
        "dup.toml": ('[[encoder]]\nid = "st:x"\nmodality = "text"\n[[encoder]]\nid = "st:x"\nmodality = "text"\n', "twice"),
        "same.toml": ('[[encoder]]\nid = "st:x"\nmodality = "text"\nname = "a"\n[[encoder]]\nid = "st:x"\nmodality = "text"\nname = "b"\n',
                      "lists st:x twice"),  # two names, one set of settings: the same embeddings twice
        "nomod.toml": ('[[encoder]]\nid = "st:x"\n', "modality"),
    }
    for fname, (text, needle) in cases.items():
        p = tmp_path / fname
        p.write_text(text)
        with pytest.raises(ZooError, match=needle):
            load_zoo_file(p)
    p = tmp_path / "pooled.toml"  # one id with two poolings is two encoders
    p.write_text('[[encoder]]\nid = "hf:x"\nmodality = "vision"\nname = "a"\npooling = "cls"\n'
                 '[[encoder]]\nid = "hf:x"\nmodality = "vision"\nname = "b"\npooling = "mean"\n')
    assert [e.pooling for e in load_zoo_file(p).encoders] == ["cls", "mean"]
    p = tmp_path / "vis.toml"
    p.write_text('[[encoder]]\nid = "baseline:pixels"\nmodality = "vision"\n')
    with pytest.raises(ZooError, match="has no text encoders"):
        resolve_zoo(str(p), "text")


def test_spec_fingerprint_ignores_display_fields_only():
    a = EncoderSpec(id="st:x", modality="text", name="A", notes="n")
    b = EncoderSpec(id="st:x", modality="text", name="B", dim=384)
    c = EncoderSpec(id="st:x", modality="text", pooling="cls")
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert a.source == "st" and a.target == "x"
    assert EncoderSpec(id="st:org/model", modality="text").name == "org/model"
