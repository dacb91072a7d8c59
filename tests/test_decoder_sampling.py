"""Temperature, top-k and nucleus (top-p) filtering on hand-computed distributions."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from decoder_transformer.model import filter_logits, sample_next_token  # noqa: E402


def kept_probs(probs, **kw):
    """Probabilities after filtering, starting from logits = log(probs) in float64."""
    logits = torch.tensor([probs], dtype=torch.float64).log()
    return filter_logits(logits, **kw).exp()[0].tolist()


def test_top_p_keeps_the_token_that_crosses_p():
    # sorted mass: 0.5, 0.8, 1.0 -> p = 0.6 needs the first two tokens
    assert kept_probs([0.5, 0.3, 0.2], top_p=0.6) == pytest.approx([0.625, 0.375, 0.0])


def test_top_p_reached_exactly_stops_there():
    assert kept_probs([0.5, 0.3, 0.2], top_p=0.8) == pytest.approx([0.625, 0.375, 0.0])
    assert kept_probs([0.2, 0.5, 0.3], top_p=0.5) == pytest.approx(
        [0.0, 1.0, 0.0]
    )  # order of ids is irrelevant
    assert kept_probs([0.5, 0.3, 0.2], top_p=0.81) == pytest.approx([0.5, 0.3, 0.2])


def test_top_p_of_one_or_more_keeps_everything():
    probs = [0.9, 0.0999999, 1e-7]
    assert kept_probs(probs, top_p=1.0) == pytest.approx(probs, abs=1e-12)
    assert kept_probs(probs, top_p=1.5) == pytest.approx(probs, abs=1e-12)


def test_top_p_keeps_ties_at_the_boundary_together():
    # 0.4 alone is short of 0.5; the crossing token is one of two tied 0.3s, so both stay
    assert kept_probs([0.3, 0.4, 0.3], top_p=0.5) == pytest.approx([0.3, 0.4, 0.3])
    # a uniform distribution keeps everything whatever p
    assert kept_probs([0.25] * 4, top_p=0.1) == pytest.approx([0.25] * 4)


def test_top_p_towards_zero_and_temperature_zero_give_the_argmax():
    probs = [0.1, 0.6, 0.3]
    assert kept_probs(probs, top_p=1e-9) == pytest.approx([0.0, 1.0, 0.0])
    assert kept_probs(probs, temperature=0.0) == pytest.approx([0.0, 1.0, 0.0])
    logits = torch.tensor([[0.3, 2.0, -1.0], [5.0, 1.0, 4.9]])
    assert sample_next_token(logits, temperature=0.0).flatten().tolist() == [1, 0]
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        assert sample_next_token(logits, temperature=1.0, top_p=1e-6, generator=g).flatten().tolist() == [
            1,
            0,
        ]


def test_temperature_scales_logits():
    logits = torch.tensor([[1.0, 2.0, 4.0]], dtype=torch.float64)
    expected = torch.softmax(logits / 0.5, dim=-1)
    torch.testing.assert_close(filter_logits(logits, temperature=0.5).exp(), expected)


@pytest.mark.parametrize("temperature", [1e-30, 1e-300, 1e-45, 1e30, 1e300])
def test_extreme_temperatures_stay_finite(temperature):
    logits = torch.tensor([[1.0, 3.0, 2.0, -50.0]], dtype=torch.float32)
    probs = filter_logits(logits, temperature=temperature, top_p=0.9).exp()
    assert torch.isfinite(probs).all() and probs.sum().item() == pytest.approx(1.0)
    if temperature < 1:
        assert probs[0].tolist() == pytest.approx([0, 1, 0, 0])
    else:  # flat: every token nearly equally likely, so top-p 0.9 keeps all four (all tied)
        assert probs[0].tolist() == pytest.approx([0.25] * 4)
    token = sample_next_token(logits, temperature=temperature, top_p=0.9)
    assert 0 <= token.item() < 4


def test_top_k_keeps_the_k_largest_and_ties():
    assert kept_probs([0.1, 0.4, 0.3, 0.2], top_k=2) == pytest.approx([0, 4 / 7, 3 / 7, 0])
    assert kept_probs([0.2, 0.4, 0.2, 0.2], top_k=2) == pytest.approx([0.2, 0.4, 0.2, 0.2])


def test_masked_logits_are_never_sampled():
    logits = torch.tensor([[-math.inf, 0.0, 0.0, -math.inf]])
    g = torch.Generator().manual_seed(0)
    draws = [sample_next_token(logits, temperature=2.0, top_p=0.5, generator=g).item() for _ in range(50)]
    assert set(draws) == {1, 2}


def test_samples_follow_the_nucleus_distribution():
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log().repeat(20000, 1)
    draws = sample_next_token(logits, temperature=1.0, top_p=0.6, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws.flatten(), minlength=3).double() / 20000
    assert freq.tolist() == pytest.approx([0.625, 0.375, 0.0], abs=0.015)  # ~4 standard errors


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": 0}, "top_k"),
    ],
)
def test_bad_sampling_arguments_raise(kw, message):
    with pytest.raises(ValueError, match=message):
        sample_next_token(torch.zeros(1, 3), **kw)
