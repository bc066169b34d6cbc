"""The model against transformers' implementation, the independent reference: same weights in,
same logits and feature maps out, for every variant."""

from __future__ import annotations

import itertools

import pytest
import torch
import transformers

import segformer
from segformer.models.config import VARIANTS, SegformerConfig
from segformer.models.segformer import (
    SegformerForImageClassification,
    SegformerForSemanticSegmentation,
)
from tests.conftest import randomize, rel


def hf_config(variant: str, num_labels: int) -> transformers.SegformerConfig:
    row = VARIANTS[variant]
    return transformers.SegformerConfig(
        hidden_sizes=row["hidden_sizes"],
        depths=row["depths"],
        decoder_hidden_size=row["decoder_hidden_size"],
        num_labels=num_labels,
    )


@pytest.mark.parametrize("variant", ["b0", "b1", "b2", "b3", "b4", "b5"])
def test_segmentation_matches_transformers(variant, tmp_path):
    reference = transformers.SegformerForSemanticSegmentation(hf_config(variant, 7)).eval()
    randomize(reference)
    reference.save_pretrained(tmp_path)
    ours = segformer.load(tmp_path)
    assert ours.config.variant == variant

    pixel_values = torch.randn(2, 3, 333, 517)
    with torch.no_grad():
        expected = reference(pixel_values, output_hidden_states=True)
        logits = ours(pixel_values)
        features = ours.encoder(pixel_values)

    assert logits.shape == (2, 7, 84, 130)  # ⌈333/4⌉, ⌈517/4⌉
    assert rel(logits, expected.logits) <= 1e-5
    assert len(features) == len(expected.hidden_states) == 4
    for ours_map, reference_map in zip(features, expected.hidden_states, strict=True):
        assert ours_map.shape == reference_map.shape
        assert rel(ours_map, reference_map) <= 1e-5


@pytest.mark.parametrize("variant", ["b0", "b2"])
def test_classification_matches_transformers(variant, tmp_path):
    reference = transformers.SegformerForImageClassification(hf_config(variant, 10)).eval()
    randomize(reference)
    reference.save_pretrained(tmp_path)
    ours = segformer.load(tmp_path)
    assert isinstance(ours, SegformerForImageClassification)

    pixel_values = torch.randn(2, 3, 224, 160)
    with torch.no_grad():
        assert rel(ours(pixel_values), reference(pixel_values).logits) <= 1e-5


def test_folded_decoder_equals_the_published_composition(tiny_model):
    features = tiny_model.encoder(torch.randn(2, 3, 70, 90))
    with torch.no_grad():
        folded = tiny_model.decode_head(features)
        published = tiny_model.decode_head.forward_as_published(features)
    assert rel(folded, published) <= 1e-6


@pytest.mark.parametrize(("height", "width"), [(64, 64), (65, 97), (31, 33), (29, 30)])
def test_logits_are_a_quarter_of_any_size_rounded_up(tiny_model, height, width):
    with torch.no_grad():
        logits = tiny_model(torch.randn(1, 3, height, width))
    assert logits.shape == (1, 3, -(-height // 4), -(-width // 4))


def test_too_small_input_is_refused_clearly(tiny_model):
    # Stage 1 runs at 1/4 resolution with an 8×8 key/value reduction: 29 pixels is the minimum.
    with pytest.raises(ValueError, match="at least 29 pixels"):
        tiny_model(torch.randn(1, 3, 28, 64))


def test_encoder_returns_four_strided_maps(tiny_model, tiny_config):
    with torch.no_grad():
        features = tiny_model.encoder(torch.randn(1, 3, 96, 128))
    assert [f.shape[1] for f in features] == tiny_config.hidden_sizes
    assert [tuple(f.shape[2:]) for f in features] == [(24, 32), (12, 16), (6, 8), (3, 4)]


# The paper's parameter counts (segmentation, 150 ADE20K labels), in millions.
PAPER_PARAMETERS = {"b0": 3.75, "b1": 13.7, "b2": 27.5, "b3": 47.3, "b4": 64.1, "b5": 84.7}


@pytest.mark.parametrize("variant", list(PAPER_PARAMETERS))
def test_parameter_counts_equal_the_paper(variant):
    with torch.device("meta"):
        model = SegformerForSemanticSegmentation(SegformerConfig.from_variant(variant, 150))
    count = sum(p.numel() for p in model.parameters()) / 1e6
    digits = 2 if variant == "b0" else 1
    assert round(count, digits) == PAPER_PARAMETERS[variant]


def test_stochastic_depth_rises_linearly_to_the_configured_rate():
    model = SegformerForSemanticSegmentation(
        SegformerConfig.from_variant("b2", 2, drop_path_rate=0.1)
    )
    rates = [block.drop_path.rate for stage in model.encoder.stages for block in stage.blocks]
    assert len(rates) == 16
    assert rates[0] == 0.0
    assert rates[-1] == pytest.approx(0.1)
    steps = [b - a for a, b in itertools.pairwise(rates)]
    assert all(s == pytest.approx(0.1 / 15) for s in steps)


def test_training_mode_is_stochastic_and_eval_mode_is_not(tiny_config):
    model = SegformerForSemanticSegmentation(
        SegformerConfig(**{**tiny_config.__dict__, "drop_path_rate": 0.5, "extra": {}})
    )
    x = torch.randn(2, 3, 32, 32)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_variant_table_matches_the_paper():
    assert VARIANTS["b0"]["hidden_sizes"] == [32, 64, 160, 256]
    for name in ("b1", "b2", "b3", "b4", "b5"):
        assert VARIANTS[name]["hidden_sizes"] == [64, 128, 320, 512]
    depths = {name: row["depths"] for name, row in VARIANTS.items()}
    assert depths == {
        "b0": [2, 2, 2, 2],
        "b1": [2, 2, 2, 2],
        "b2": [3, 4, 6, 3],
        "b3": [3, 4, 18, 3],
        "b4": [3, 8, 27, 3],
        "b5": [3, 6, 40, 3],
    }
    assert {
        row["decoder_hidden_size"] for name, row in VARIANTS.items() if name in ("b0", "b1")
    } == {256}
    assert {
        row["decoder_hidden_size"] for name, row in VARIANTS.items() if name not in ("b0", "b1")
    } == {768}


def _reference_attention(q, k, v):
    """softmax(q·kᵀ/√d)·v in float64, written out independently."""
    q, k, v = q.double(), k.double(), v.double()
    weights = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
    return weights @ v


def test_explicit_and_fused_attention_agree_with_the_formula_and_in_gradients():
    from segformer.models.segformer import attend

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 50, 16, requires_grad=True) for _ in range(3))
    expected = _reference_attention(q, k, v)
    grads = {}
    for explicit in (False, True):
        out = attend(q, k, v, explicit=explicit)
        assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-6)
        grads[explicit] = torch.autograd.grad(out.square().sum(), (q, k, v))
    for fused, spelled in zip(grads[False], grads[True], strict=True):
        assert torch.allclose(fused, spelled, rtol=1e-4, atol=1e-5)


def test_attention_runs_explicit_only_for_small_half_precision_cpu_inputs(monkeypatch):
    from segformer.models import segformer as model_module

    calls = []
    fused = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        model_module.F,
        "scaled_dot_product_attention",
        lambda *args, **kwargs: calls.append("fused") or fused(*args, **kwargs),
    )
    small = [torch.randn(1, 1, 64, 8) for _ in range(3)]
    model_module.attend(*small)
    model_module.attend(*(t.bfloat16() for t in small))
    monkeypatch.setattr(model_module, "EXPLICIT_ATTENTION_MAX_HEAD_SCORES", 64 * 64 - 1)
    model_module.attend(*(t.bfloat16() for t in small))
    assert calls == ["fused", "fused"]  # fp32, then bf16 beyond the size limit


def test_bf16_training_forward_and_backward_stay_close_to_fp32(tiny_config):
    torch.manual_seed(0)
    model = SegformerForSemanticSegmentation(tiny_config).train()
    pixels = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    full = model(pixels)
    (full_grad,) = torch.autograd.grad(
        full.square().mean(), model.encoder.stages[0].patch_embed.proj.weight
    )
    torch.manual_seed(1)  # same dropout and stochastic-depth draws
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = model(pixels)
    (half_grad,) = torch.autograd.grad(
        half.float().square().mean(), model.encoder.stages[0].patch_embed.proj.weight
    )
    assert (half.float() - full).norm() / full.norm() < 3e-2
    assert (half_grad - full_grad).norm() / full_grad.norm() < 1e-1
