"""Temperature, top-k and nucleus (top-p) filtering on hand-computed distributions."""

import bisect
import itertools
import math
import sys
from fractions import Fraction
from pathlib import Path

import mpmath
import pytest
import scipy.stats
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


def test_top_p_reached_exactly_stops_there():  # exact in the true softmax, rounded by log / exp
    assert kept_probs([0.5, 0.3, 0.2], top_p=0.8) == pytest.approx([0.625, 0.375, 0.0])
    assert kept_probs([0.2, 0.5, 0.3], top_p=0.5) == pytest.approx(
        [0.0, 1.0, 0.0]
    )  # order of ids is irrelevant
    assert kept_probs([0.5, 0.3, 0.2], top_p=0.81) == pytest.approx([0.5, 0.3, 0.2])


def test_top_p_of_one_keeps_everything_and_more_is_refused():
    probs = [0.9, 0.0999999, 1e-7]
    assert kept_probs(probs, top_p=1.0) == pytest.approx(probs, abs=1e-12)
    for bad in (1.5, 1 + 1e-12, math.inf):
        with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
            kept_probs(probs, top_p=bad)


# ---------------------------------------------------------------------------------------------
# the nucleus against the true softmax: exact rationals and 50-digit arithmetic


class TrueSoftmax:
    """A row's softmax in 50-digit arithmetic from its float64 logits (each exactly representable):
    the true mass of the k most likely tokens, and the smallest k whose mass is >= p."""

    def __init__(self, logits: list[float]):
        with mpmath.workdps(50):
            top = max(logits)
            weights = sorted((mpmath.exp(mpmath.mpf(z) - top) for z in logits if z > -math.inf), reverse=True)
            self.partial = list(itertools.accumulate(weights))
            self.total = self.partial[-1]

    def mass(self, k: int) -> float:
        with mpmath.workdps(50):
            return self.partial[k - 1] / self.total

    def nucleus_size(self, p: float) -> int:
        with mpmath.workdps(50):
            return bisect.bisect_left(self.partial, mpmath.mpf(p) * self.total) + 1


def check_against_truth(logits: torch.Tensor, top_ps: list[float]) -> int:
    """filter_logits' nucleus on each row against the true softmax: the kept tokens are a most-likely
    set, never larger than the smallest one that reaches p; smaller only when what it lacks is below
    1e-11 of the mass (float64 cannot tell that from reaching p). Returns the exactly minimal rows."""
    truths = [TrueSoftmax(row) for row in logits.double().tolist()]
    exact = 0
    for top_p in top_ps:
        kept = filter_logits(logits, top_p=top_p, generator=torch.Generator().manual_seed(0)).isfinite()
        for values, keep, truth in zip(logits, kept, truths):
            n = int(keep.sum())
            if n < len(values):
                assert values[keep].min() >= values[~keep].max()
            size = truth.nucleus_size(top_p)
            assert n <= size, f"non-minimal: {n} kept, {size} reach {top_p}"
            assert n == size or top_p - truth.mass(n) < 1e-11, f"{n} kept fall short of {top_p}"
            exact += n == size
    return exact


def test_uniform_rows_keep_exactly_the_fewest_tokens_that_reach_p():
    """n equally likely tokens reach p = k/8 with ceil(p n) of them, decided by exact rationals; as
    full rows, inside a larger row of -inf, at any constant logit and through a temperature."""
    non_minimal, checked = 0, 0
    for n in range(2, 301):
        ps = [k / 8 for k in range(1, 8)]
        expected = [math.ceil(Fraction(k, 8) * n) for k in range(1, 8)]
        rows = {
            "zeros": torch.zeros(1, n),
            "constant": torch.full((1, n), 3.7, dtype=torch.float64),
            "in -inf": torch.cat([torch.full((1, 5), -math.inf), torch.full((1, n), -1.3)], dim=1),
        }
        for logits in rows.values():
            for temperature in (1.0, 0.7):
                for p, size in zip(ps, expected):
                    kept = filter_logits(logits, temperature=temperature, top_p=p).isfinite()
                    non_minimal += int(kept.sum()) != size
                    checked += 1
    assert checked == 299 * 7 * 6 and non_minimal == 0


def test_nucleus_is_the_true_smallest_set_on_random_logits():
    logits = torch.randn(200, 100, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    assert check_against_truth(logits, [0.1, 0.5, 0.9, 0.95, 0.999]) == 200 * 5


def test_nucleus_is_the_true_smallest_set_on_tied_logits():
    # logits from {0, 1, 2}: every row full of ties, the boundary often inside a tie
    logits = torch.randint(0, 3, (200, 12), generator=torch.Generator().manual_seed(1)).double()
    assert check_against_truth(logits, [0.2, 0.5, 0.75, 0.9]) == 200 * 4


@pytest.mark.slow  # 50,257 exponentials in 50 digits
def test_nucleus_is_the_true_smallest_set_at_gpt2_vocabulary_size():
    logits = torch.randn(1, 50_257, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2
    assert check_against_truth(logits, [0.5, 0.9, 0.999]) == 3


@pytest.mark.parametrize("vocab", [5, pytest.param(50_257, marks=pytest.mark.slow)])
@pytest.mark.parametrize("shortfall", [1e-9, 0.0, -1e-9])
def test_near_misses_keep_a_token_needed_by_1e_9(vocab, shortfall):
    """The top two tokens hold p - shortfall of the mass: a third is needed exactly when shortfall > 0;
    an exact hit (0 by construction, off by float64 rounding of the logits) keeps two."""
    p = 0.5
    tail = (0.5 + shortfall) / (vocab - 2)
    probs = torch.tensor([0.3, 0.2 - shortfall] + [tail] * (vocab - 2), dtype=torch.float64)
    logits = probs.log()[None]
    kept = filter_logits(logits, top_p=p).isfinite()[0]
    assert int(kept.sum()) == (3 if shortfall > 0 else 2) and kept[:2].all()
    if shortfall:  # the oracle agrees; for the exact hit it sees the rounding of log()
        assert TrueSoftmax(logits[0].tolist()).nucleus_size(p) == int(kept.sum())


def test_tokens_tied_at_the_boundary_are_kept_at_random():
    """[0.4, 0.3, 0.3] at p = 0.5 keeps token 0 and one of the tied 0.3s, each half of the time; four
    equally likely tokens at p = 0.5 keep two, each token half of the time; the draws follow
    [4/7, 3/14, 3/14] (chi-square tests at the 0.1% level)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.4, 0.3, 0.3]]).log().repeat(4000, 1)
    kept = filter_logits(logits, top_p=0.5, generator=gen).isfinite()
    assert kept[:, 0].all() and (kept.sum(dim=1) == 2).all()
    assert scipy.stats.chisquare(kept[:, 1:].sum(dim=0).tolist()).pvalue > 1e-3
    kept = filter_logits(torch.zeros(4000, 4), top_p=0.5, generator=gen).isfinite()
    assert (kept.sum(dim=1) == 2).all()
    assert scipy.stats.chisquare(kept.sum(dim=0).tolist()).pvalue > 1e-3
    draws = sample_next_token(logits.repeat(2, 1), top_p=0.5, generator=gen).flatten()
    counts = torch.bincount(draws, minlength=3).tolist()
    assert scipy.stats.chisquare(counts, [8000 * 4 / 7, 8000 * 3 / 14, 8000 * 3 / 14]).pvalue > 1e-3


def test_the_random_tie_order_is_reproducible_with_a_generator():
    logits = torch.zeros(50, 10)
    first, second = (
        filter_logits(logits, top_p=0.35, generator=torch.Generator().manual_seed(7)).isfinite()
        for _ in range(2)
    )
    assert torch.equal(first, second) and (first.sum(dim=1) == 4).all()
    assert len({tuple(row.tolist()) for row in first}) > 10  # not the same four tokens every row


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
