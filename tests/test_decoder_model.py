"""decoder_transformer/model.py: causality, RoPE's properties, the KV cache against full forward passes."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from decoder_transformer.model import (  # noqa: E402
    POSITIONS,
    DecoderLM,
    KVCache,
    ModelConfig,
    apply_rope,
    rope_rotation,
)


def tiny_model(pos: str, dropout: float = 0.0, block_size: int = 16) -> DecoderLM:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=11, block_size=block_size, n_layer=2, n_head=2, n_embd=16, dropout=dropout, pos=pos
    )
    return DecoderLM(config).eval()


@pytest.mark.parametrize("pos", POSITIONS)
def test_changing_later_tokens_leaves_earlier_logits_unchanged(pos):
    model = tiny_model(pos)
    x = torch.randint(0, 11, (2, 16), generator=torch.Generator().manual_seed(1))
    changed = x.clone()
    changed[:, 9:] = (
        changed[:, 9:] + 1 + torch.randint(0, 9, changed[:, 9:].shape)
    ) % 11  # every later token differs
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-3  # the later positions do see the change


def test_rope_rotation_preserves_norms():
    x = torch.randn(2, 3, 10, 8)
    rotation = rope_rotation(torch.arange(10), 8, 10000.0)
    torch.testing.assert_close(apply_rope(x, rotation).norm(dim=-1), x.norm(dim=-1))


def test_rope_matches_the_papers_rotation_matrix():
    """Su et al. eq. 13/15: block-diagonal 2x2 rotations by m * theta_i, written out by hand."""
    x = torch.randn(6, dtype=torch.float64)
    m, base, d = 5, 10000.0, 6
    expected = torch.empty_like(x)
    for i in range(d // 2):
        theta = base ** (-2 * i / d)
        c, s = torch.cos(torch.tensor(m * theta)), torch.sin(torch.tensor(m * theta))
        expected[2 * i] = c * x[2 * i] - s * x[2 * i + 1]
        expected[2 * i + 1] = s * x[2 * i] + c * x[2 * i + 1]
    got = apply_rope(x.float().view(1, 1, 1, d), rope_rotation(torch.tensor([m]), d, base)).view(d)
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)


def test_rope_dot_product_depends_only_on_the_offset():
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        rotated_q = apply_rope(q, rope_rotation(torch.tensor([m]), 16, 10000.0))
        rotated_k = apply_rope(k, rope_rotation(torch.tensor([n]), 16, 10000.0))
        return (rotated_q * rotated_k).sum().item()

    for offset in (0, 1, 7, 30):
        reference = score(offset, 0)
        for shift in (3, 50, 200):
            assert score(offset + shift, shift) == pytest.approx(reference, abs=1e-4)
    assert abs(score(7, 0) - score(1, 0)) > 1e-3  # and it does depend on the offset


@pytest.mark.parametrize("pos", POSITIONS)
def test_kv_cache_logits_equal_full_forward(pos):
    model = tiny_model(pos)
    x = torch.randint(0, 11, (3, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, _ = model(x)
        cache = KVCache(model.config, 3, "cpu")
        pieces = [model(x[:, :5], cache=cache)[0], model(x[:, 5:9], cache=cache)[0]]  # prefill, then a chunk
        pieces += [model(x[:, t : t + 1], cache=cache)[0] for t in range(9, 16)]  # then one token at a time
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="longer than the model's block_size"):
        model(x[:, :1], cache=cache)  # the cache holds block_size tokens


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_generate_with_and_without_cache_draws_the_same_tokens(pos):
    """40 new tokens with block_size 16 pass the window restart twice; both paths must agree exactly."""
    model = tiny_model(pos)
    prompt = torch.randint(0, 11, (2, 3), generator=torch.Generator().manual_seed(3))
    runs = [
        model.generate(
            prompt, 40, temperature=1.0, top_p=0.9, use_cache=c, generator=torch.Generator().manual_seed(4)
        )
        for c in (True, False)
    ]
    assert runs[0].shape == (2, 43)
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0][:, :3], prompt)


def test_greedy_generation_follows_the_argmax_of_full_forward():
    model = tiny_model("rope")
    out = model.generate(torch.tensor([[1, 2]]), 10, temperature=0.0)
    with torch.no_grad():
        for t in range(2, 12):
            logits, _ = model(out[:, :t])
            assert out[0, t] == logits[0, -1].argmax()


def test_learned_positions_refuse_longer_context_but_rope_runs_it():
    x = torch.randint(0, 11, (1, 32))
    with pytest.raises(ValueError, match="longer than the model's block_size 16"):
        tiny_model("learned")(x)
    logits, _ = tiny_model("rope")(x)
    assert logits.shape == (1, 32, 11) and torch.isfinite(logits).all()


def test_loss_is_cross_entropy_and_head_is_tied():
    model = tiny_model("rope")
    x, y = torch.randint(0, 11, (2, 8)), torch.randint(0, 11, (2, 8))
    logits, loss = model(x, y)
    manual = -torch.log_softmax(logits, -1).gather(-1, y[..., None]).mean()
    torch.testing.assert_close(loss, manual)
    assert model.lm_head.weight is model.wte.weight


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(n_embd=10, n_head=4)
    with pytest.raises(ValueError, match="pos must be one of"):
        ModelConfig(pos="alibi")
