"""decoder_transformer's evaluation: the strided full-context loss against a per-token brute force."""

import math
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "decoder_transformer"))
from model import POSITIONS, DecoderLM, ModelConfig  # noqa: E402
from ngram import KneserNey  # noqa: E402
from textdata import sliding_loss, sliding_windows  # noqa: E402

T = 8


def tiny_model(pos: str) -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(ModelConfig(vocab_size=7, block_size=T, n_layer=2, n_head=2, n_embd=16, pos=pos)).eval()


def brute_force(model, data: torch.Tensor, context_start) -> float:
    """Mean nats over targets 1 .. len(data) - 1, target t scored by a forward over data[start(t) : t]."""
    total = 0.0
    with torch.no_grad():
        for t in range(1, len(data)):
            logits = model(data[None, context_start(t) : t])[0][0, -1].double()
            total -= logits.log_softmax(-1)[data[t]].item()
    return total / (len(data) - 1)


@pytest.mark.parametrize("pos", POSITIONS)
def test_stride_one_scores_every_token_with_its_full_context(pos):
    model, data = tiny_model(pos), torch.randint(7, (45,), generator=torch.Generator().manual_seed(1))
    expected = brute_force(model, data, lambda t: max(0, t - T))  # all of block_size, or what exists
    got = sliding_loss(lambda x: model(x)[0], data, T, stride=1, batch_size=5)
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("stride", [2, 3, T])
def test_a_longer_stride_scores_each_token_once_with_at_least_block_size_minus_stride_plus_one(stride):
    n = 40
    starts, first = sliding_windows(n, T, stride)
    context = {}  # target -> tokens of context it is scored with
    for a, f in zip(starts.tolist(), first.tolist()):
        for p in range(f, T):
            assert a + p + 1 not in context
            context[a + p + 1] = p + 1
    assert sorted(context) == list(range(1, n))
    assert all(c == t for t, c in context.items() if t <= T)  # the split's first tokens: all there is
    assert all(T - stride + 1 <= c <= T for t, c in context.items() if t > T)
    model, data = tiny_model("rope"), torch.randint(7, (n,), generator=torch.Generator().manual_seed(2))
    expected = brute_force(model, data, lambda t: t - context[t])
    got = sliding_loss(lambda x: model(x)[0], data, T, stride, batch_size=4)
    assert got == pytest.approx(expected, rel=1e-5)


def test_stride_block_size_is_the_tiled_loss_plus_the_remainder():
    model = tiny_model("learned")
    data = torch.randint(7, (4 * T + 1,), generator=torch.Generator().manual_seed(3))
    x, y = data[:-1].view(4, T), data[1:].view(4, T)
    tiled = torch.nn.functional.cross_entropy(model(x)[0].flatten(0, 1), y.flatten()).item()
    assert sliding_loss(lambda x: model(x)[0], data, T, T, batch_size=3) == pytest.approx(tiled, rel=1e-5)


def test_sliding_windows_refuses_bad_strides():
    for stride in (0, T + 1):
        with pytest.raises(ValueError, match="stride"):
            sliding_windows(100, T, stride)
    with pytest.raises(ValueError, match="tokens"):
        sliding_windows(T, T, 1)
    starts, first = sliding_windows(T + 1, T, 1)  # exactly one window: it scores everything
    assert starts.tolist() == [0] and first.tolist() == [0]


# ---------------------------------------------------------------------------------------------
# the byte n-gram baselines


def test_kneser_ney_probabilities_sum_to_one_over_the_256_bytes():
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\nnaïve ✓\n".encode() * 3
    for order in range(1, 6):
        model = KneserNey(text, order)
        for history in (b"", b"F", b"hear ", b"\x00\xff\x01\x02", "ï".encode(), b"zzzz"):
            assert sum(model.prob(history, byte) for byte in range(256)) == pytest.approx(1.0, abs=1e-12)


def test_kneser_ney_by_hand():
    """b"abab", order 2: bigram counts ab 2, ba 1 (discount 1 / (1 + 2 * 1)); continuation counts of
    the unigrams a 1, b 1 (discount 2 / (2 + 0) = 1, so they give the uniform 1/256 unchanged)."""
    model = KneserNey(b"abab", 2)
    assert model.discount == {2: pytest.approx(1 / 3), 1: 1.0}
    assert model.prob(b"a", ord("b")) == pytest.approx((2 - 1 / 3 + 1 / 3 * 1 / 256) / 2)
    assert model.prob(b"a", ord("a")) == pytest.approx(1 / 3 * 1 / 256 / 2)
    assert model.prob(b"c", ord("a")) == pytest.approx(1 / 256)  # unseen context: the order below
    assert model.bits(b"ab") == pytest.approx(-math.log2(model.prob(b"a", ord("b"))))


def test_longer_n_grams_predict_a_repetitive_text_better():
    rng = random.Random(0)
    words = [rng.choice(["the ", "king ", "and ", "queen ", "of ", "york "]) for _ in range(3000)]
    data = "".join(words).encode()
    bits = [KneserNey(data[:12000], order).bits(data[12000:]) for order in (1, 2, 3)]
    assert bits[0] > bits[1] > bits[2]
