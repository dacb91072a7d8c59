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


def test_top_p_breaks_ties_by_token_id():
    # 0.4 alone is short of 0.5; of the two tied 0.3s the lower id (0) completes the set
    assert kept_probs([0.3, 0.4, 0.3], top_p=0.5) == pytest.approx([3 / 7, 4 / 7, 0.0])
    # a uniform distribution keeps the fewest tokens that reach p: 2 of 4 for p = 0.5, 1 for p = 0.1
    assert kept_probs([0.25] * 4, top_p=0.5) == pytest.approx([0.5, 0.5, 0.0, 0.0])
    assert kept_probs([0.25] * 4, top_p=0.1) == pytest.approx([1.0, 0.0, 0.0, 0.0])
    assert kept_probs([0.25] * 4, top_p=0.51) == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.0])


def exact_units(x: float) -> int:
    """x (a float64 >= 0) as an exact integer multiple of 2^-1074, the smallest float64 step."""
    numerator, denominator = x.as_integer_ratio()  # denominator is a power of two <= 2^1074
    return numerator * (2**1074 // denominator)


def reference_nucleus(probs: list[float], p: float) -> tuple[set[int], float]:
    """The smallest set by exact arithmetic: rank by (probability, then lower id) and add tokens until
    the exact sum of their float64 probabilities is >= p. Also returns how close (relative) the exact
    partial sums next to the boundary come to p, to tell rounding-limited rows apart."""
    order = sorted(range(len(probs)), key=lambda i: (-probs[i], i))
    target, total, kept, margin = exact_units(p), 0, set(), math.inf
    for i in order:
        kept.add(i)
        total += exact_units(probs[i])
        margin = min(margin, abs(total - target) / target)
        if total >= target:
            break
    return kept, margin


def assert_matches_reference(logits: torch.Tensor, top_p: float) -> int:
    """filter_logits' nucleus against reference_nucleus on every row; returns the rows compared."""
    kept = filter_logits(logits, top_p=top_p).isfinite()
    probs = torch.softmax(logits.double(), dim=-1)  # the float64 probabilities the filter ranks
    compared = 0
    for row in range(len(logits)):
        expected, margin = reference_nucleus(probs[row].tolist(), top_p)
        if margin < 1e-12:  # p within float64 rounding of a partial sum: either answer is right
            continue
        assert set(kept[row].nonzero().flatten().tolist()) == expected, f"row {row}"
        compared += 1
    return compared


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.95, 0.999])
def test_nucleus_equals_the_exact_smallest_set_on_random_logits(top_p):
    logits = torch.randn(300, 100, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    assert assert_matches_reference(logits, top_p) == 300


@pytest.mark.parametrize("top_p", [0.2, 0.5, 0.75, 0.9])
def test_nucleus_equals_the_exact_smallest_set_on_tied_logits(top_p):
    # logits from {0, 1, 2}: every row full of ties, the boundary often inside a tie
    logits = torch.randint(0, 3, (300, 12), generator=torch.Generator().manual_seed(1)).double()
    assert assert_matches_reference(logits, top_p) >= 290


def test_nucleus_equals_the_exact_smallest_set_at_a_50k_vocabulary():
    """The issue's case: p = 0.999 over 50,000 tokens, where a 1e-6 tolerance dropped tokens of up to
    4e-4 probability in 377 of 576 rows."""
    logits = torch.randn(4, 50_000, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2
    assert assert_matches_reference(logits, 0.999) == 4


def test_nucleus_agrees_with_hugging_face_top_p_warper():
    transformers = pytest.importorskip("transformers")  # optional cross-check, not a requirement
    logits = torch.randn(200, 64, generator=torch.Generator().manual_seed(3)) * 2  # float32, no ties
    for top_p in (0.3, 0.8, 0.95):
        ours = filter_logits(logits, top_p=top_p).isfinite()
        warper = transformers.TopPLogitsWarper(top_p=top_p)
        theirs = warper(torch.zeros(200, 1, dtype=torch.long), logits.clone()).isfinite()
        probs = torch.softmax(logits.double(), dim=-1)
        near = [reference_nucleus(r.tolist(), top_p)[1] < 1e-5 for r in probs]  # HF sums in float32
        rows = [i for i in range(200) if not near[i]]
        assert len(rows) > 190 and torch.equal(ours[rows], theirs[rows])


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
    else:  # flat: every token nearly equally likely, so top-p 0.9 keeps the four (0.75 < 0.9)
        assert probs[0].tolist() == pytest.approx([0.25] * 4)
    token = sample_next_token(logits, temperature=temperature, top_p=0.9)
    assert 0 <= token.item() < 4


def test_top_k_keeps_the_k_largest_and_ties():
    assert kept_probs([0.1, 0.4, 0.3, 0.2], top_k=2) == pytest.approx([0, 4 / 7, 3 / 7, 0])
    assert kept_probs([0.2, 0.4, 0.2, 0.2], top_k=2) == pytest.approx([0.2, 0.4, 0.2, 0.2])


def test_masked_logits_are_never_sampled():
    logits = torch.tensor([[-math.inf, 0.0, 0.0, -math.inf]])
    g = torch.Generator().manual_seed(0)
    draws = [sample_next_token(logits, temperature=2.0, top_p=0.9, generator=g).item() for _ in range(50)]
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


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kw", [{}, {"temperature": 0.7, "top_k": 5}, {"top_p": 0.8}])
def test_sampling_draws_what_torch_multinomial_draws(device, kw):
    """The exponential race with a generator gives torch.multinomial's tokens for the same generator
    state (the oracle: torch's own sampler on the filtered probabilities), and noise drawn beforehand
    from that generator (what a CUDA graph replays) gives them too."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)).to(device)
    probs = filter_logits(logits, **kw).exp()
    for seed in range(30):
        expected = torch.multinomial(probs, 1, generator=torch.Generator(device).manual_seed(seed))
        ours = sample_next_token(logits, **kw, generator=torch.Generator(device).manual_seed(seed))
        noise = torch.empty(4, 50, dtype=torch.float64, device=device)
        noise.exponential_(1, generator=torch.Generator(device).manual_seed(seed))
        assert torch.equal(ours, expected) and torch.equal(
            sample_next_token(logits, **kw, noise=noise), expected
        )
