"""Alignment heads: shapes, parameter counts, token masking, config round trip."""

from __future__ import annotations

import json

import pytest
import torch

from pairscout.align.heads import HEAD_KINDS, HeadConfig, HeadError, build_head, masked_mean
from pairscout.errors import PairscoutError


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _inputs(b=3, d=12, t=5, d_tok=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g), torch.randn(b, t, d_tok, generator=g)


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_output_shape(kind):
    cfg = HeadConfig(kind=kind, in_dim=12, out_dim=7, hidden_mult=2, token_dim=10)
    head = build_head(cfg)
    pooled, tokens = _inputs(d_tok=10)
    out = head(pooled, tokens)
    assert out.shape == (3, 7) and out.dtype == torch.float32
    assert head.config is cfg
    out.sum().backward()  # every parameter gets a gradient
    assert all(p.grad is not None for p in head.parameters())


def test_parameter_counts():
    d, o = 12, 7
    assert _n_params(build_head(HeadConfig(kind="linear", in_dim=d, out_dim=o))) == d * o + o
    h = 8 * d  # SAIL's default width
    glu = build_head(HeadConfig(kind="glu", in_dim=d, out_dim=o))
    assert _n_params(glu) == 2 * d + 2 * (d * h + h) + h * o + o
    hm = 4 * d
    mlp = build_head(HeadConfig(kind="mlp", in_dim=d, out_dim=o))
    assert _n_params(mlp) == 2 * d + d * hm + hm + hm * o + o
    mlp20 = build_head(HeadConfig(kind="mlp", in_dim=d, out_dim=o, mlp_hidden=20))
    assert _n_params(mlp20) == 2 * d + d * 20 + 20 + 20 * o + o


def test_glu_matches_star_formula():
    head = build_head(HeadConfig(kind="glu", in_dim=6, out_dim=4, hidden_mult=3)).eval()
    x, _ = _inputs(d=6)
    xn = head.norm(x)
    expected = head.g(torch.clamp(head.f1(xn), 0, 6) * head.f2(xn))
    torch.testing.assert_close(head(x), expected)


def test_local_global_needs_tokens():
    head = build_head(HeadConfig(kind="local_global", in_dim=12, out_dim=7))
    pooled, _ = _inputs()
    with pytest.raises(HeadError) as err:
        head(pooled)
    msg = str(err.value)
    assert isinstance(err.value, PairscoutError) and "\n" not in msg
    assert "local_global needs token features" in msg and "pairscout encode --tokens" in msg
    assert HeadConfig(kind="local_global", in_dim=4).needs_tokens
    assert not HeadConfig(kind="glu", in_dim=4).needs_tokens


def test_token_mask_ignores_padding():
    head = build_head(HeadConfig(kind="local_global", in_dim=12, out_dim=7)).eval()
    pooled, tokens = _inputs(t=5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    out = head(pooled, tokens, mask)
    garbage = tokens.clone()
    garbage[~mask] = torch.randn(int((~mask).sum()), 12) * 100
    garbage[2, 4] = float("nan")
    torch.testing.assert_close(head(pooled, garbage, mask), out)
    # the same rows without padding, one at a time, give the same output
    for i, n in enumerate(mask.sum(1).tolist()):
        torch.testing.assert_close(head(pooled[i : i + 1], tokens[i : i + 1, :n]), out[i : i + 1])
    # int 0/1 masks are accepted; no mask means all tokens count
    torch.testing.assert_close(head(pooled, tokens, mask.long()), out)
    assert not torch.allclose(head(pooled, tokens), out)


def test_masked_mean_empty_row_is_zero():
    tokens = torch.ones(2, 3, 4)
    mask = torch.tensor([[True, False, False], [False, False, False]])
    torch.testing.assert_close(masked_mean(tokens, mask), torch.tensor([[1.0] * 4, [0.0] * 4]))


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_config_round_trip(kind):
    cfg = HeadConfig(kind=kind, in_dim=12, out_dim=7, hidden_mult=3, mlp_hidden=16, dropout=0.1, token_dim=9)
    data = json.loads(json.dumps(cfg.to_dict()))  # what is saved next to the weights
    again = HeadConfig.from_dict(data)
    assert again == cfg
    a, b = build_head(cfg), build_head(data)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    b.load_state_dict(a.state_dict())


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(kind="transformer", in_dim=4), "kind"),
        (dict(kind="linear", in_dim=0), "in_dim"),
        (dict(kind="mlp", in_dim=4, mlp_hidden=-1), "mlp_hidden"),
        (dict(kind="glu", in_dim=4, dropout=1.5), "dropout"),
    ],
)
def test_bad_configs_raise_one_line(bad, match):
    with pytest.raises(HeadError, match=match) as err:
        HeadConfig(**bad)
    assert "\n" not in str(err.value) and "Fix:" in str(err.value)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(HeadError, match="unknown keys"):
        HeadConfig.from_dict({"kind": "linear", "in_dim": 4, "width": 3})


def test_wrong_input_dim_is_clear():
    head = build_head(HeadConfig(kind="linear", in_dim=12, out_dim=7))
    with pytest.raises(ValueError, match=r"\(B, 12\)"):
        head(torch.randn(2, 11))
