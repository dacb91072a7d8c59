"""decoder_transformer/model.py: causality, RoPE's properties, the KV cache against full forward passes."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from decoder_transformer.model import (  # noqa: E402
    POSITIONS,
    CUDAGraphDecoder,
    DecoderLM,
    KVCache,
    ModelConfig,
    SplitHeads,
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


def tiny_layers(pos: str, n_layer: int) -> DecoderLM:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=11, block_size=16, n_layer=n_layer, n_head=2, n_embd=16, pos=pos)
    return DecoderLM(config).eval()


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
    if pos in ("learned", "sinusoidal"):  # absolute positions: the cache ends at block_size
        with pytest.raises(ValueError, match="longer than the model's block_size"):
            model(x[:, :1], cache=cache)


@pytest.mark.parametrize("pos", ["rope", "none"])
def test_sliding_cache_equals_windowed_full_forward_over_several_windows(pos):
    """56 tokens = 3.5 windows of 16: prefill, a chunk longer than the window, then single tokens."""
    model = tiny_model(pos)
    x = torch.randint(0, 11, (2, 56), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full, _ = model(x, window=16)  # every position attends to the last 16 positions
        cache = KVCache(model.config, 2, "cpu")
        pieces = [model(x[:, :5], cache=cache)[0], model(x[:, 5:25], cache=cache)[0]]
        pieces += [model(x[:, t : t + 1], cache=cache)[0] for t in range(25, 56)]
        assert model(x, window=None)[0][:, 40:].sub(full[:, 40:]).abs().max() > 1e-3  # the window matters
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pos", ["rope", "none"])
def test_one_layer_sliding_cache_equals_a_full_forward_over_the_cropped_window(pos):
    """With one layer the sliding cache is nanoGPT's crop: logits of a full forward over the last 16
    tokens (positions 0..15). With two layers older tokens keep their wider context, so it differs."""
    x = torch.randint(0, 11, (2, 50), generator=torch.Generator().manual_seed(6))
    for n_layer in (1, 2):
        model = tiny_layers(pos, n_layer)
        with torch.no_grad():
            cache = KVCache(model.config, 2, "cpu")
            cached = torch.cat(
                [model(x[:, :16], cache=cache)[0][:, -1:]]
                + [model(x[:, t - 1 : t], cache=cache)[0] for t in range(17, 51)],
                dim=1,
            )  # logits after x[:, :t] for t = 16 .. 50
            cropped = torch.cat([model(x[:, t - 16 : t])[0][:, -1:] for t in range(16, 51)], dim=1)
        if n_layer == 1:
            torch.testing.assert_close(cached, cropped, rtol=1e-5, atol=1e-5)
        else:
            assert (cached - cropped)[:, 1:].abs().max() > 1e-3


def test_rope_cache_far_from_position_zero_scores_by_offset_only():
    """Keys rotated at absolute positions near 10^5 give the logits of positions 0.. (float64 angles)."""
    model = tiny_model("rope")
    x = torch.randint(0, 11, (2, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full, _ = model(x, window=16)
        cache = KVCache(model.config, 2, "cpu", first_position=100_003)
        far = torch.cat(
            [model(x[:, :4], cache=cache)[0]]
            + [model(x[:, t : t + 1], cache=cache)[0] for t in range(4, 40)],
            dim=1,
        )
    torch.testing.assert_close(far, full, rtol=1e-5, atol=2e-5)
    assert len(model.rope_table) >= 100_043


@pytest.mark.parametrize("pos", POSITIONS)
def test_generate_with_and_without_cache_draws_the_same_tokens(pos):
    """60 new tokens with block_size 16: the window slides past three window lengths."""
    model = tiny_model(pos)
    prompt = torch.randint(0, 11, (2, 3), generator=torch.Generator().manual_seed(3))
    runs = [
        model.generate(
            prompt, 60, temperature=1.0, top_p=0.9, use_cache=c, generator=torch.Generator().manual_seed(4)
        )
        for c in (True, False)
    ]
    assert runs[0].shape == (2, 63)
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0][:, :3], prompt)


@pytest.mark.parametrize("pos", POSITIONS)
def test_greedy_generation_sees_the_full_window_every_step(pos):
    """Each greedy token is the argmax of a full forward: over the last 16 tokens (learned, sinusoidal:
    nanoGPT's crop) or over the whole prefix with the 16-position window mask (rope, none)."""
    model = tiny_model(pos)
    out = model.generate(torch.tensor([[1, 2]]), 40, temperature=0.0)
    with torch.no_grad():
        for t in range(2, 42):
            if pos in ("rope", "none"):
                logits, _ = model(out[:, :t], window=16)
            else:
                logits, _ = model(out[:, max(0, t - 16) : t])
            assert out[0, t] == logits[0, -1].argmax()


def test_decoding_writes_into_the_preallocated_cache():
    model = tiny_model("rope")
    cache = KVCache(model.config, 1, "cpu")
    pointers = (cache.keys.data_ptr(), cache.values.data_ptr())
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        for t in range(40):
            model(torch.tensor([[t % 11]]), cache=cache)
    assert (cache.keys.data_ptr(), cache.values.data_ptr()) == pointers and cache.length == 43
    assert cache.keys.abs().sum(dim=-1).gt(0).all()  # every slot of the ring written


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


@pytest.mark.parametrize("rotate", [True, False])
def test_split_heads_gradients_equal_autograd_through_views(rotate):
    """SplitHeads' hand-written backward against autograd through slices, views and apply_rope."""
    qkv = torch.randn(2, 5, 3 * 8, dtype=torch.float64, requires_grad=True)
    rotation = rope_rotation(torch.arange(5), 4, 10000.0) if rotate else None
    grads = [torch.randn(2, 2, 5, 4, dtype=torch.float64) for _ in range(3)]
    ours = SplitHeads.apply(qkv, rotation, 2)
    heads = qkv.view(2, 5, 3, 2, 4)
    qk = (
        apply_rope(heads[:, :, :2].float(), rotation[:, None, None, :]).double()
        if rotate
        else heads[:, :, :2]
    )
    reference = (qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2), heads[:, :, 2].transpose(1, 2))
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    grad_ours = torch.autograd.grad(ours, qkv, grads)[0]
    grad_reference = torch.autograd.grad(reference, qkv, grads)[0]
    torch.testing.assert_close(grad_ours, grad_reference, rtol=1e-6, atol=1e-6)


def test_fused_optimizer_follows_the_reference_adamw():
    """make_optimizer's fused kernel against torch's single-tensor AdamW (the for-loop reference) on the
    same parameter groups: equal parameters after several steps, matrices decayed, gains not."""
    fused_model, plain_model = tiny_model("rope"), tiny_model("rope")
    fused = fused_model.make_optimizer(1e-2, 0.1, (0.9, 0.99), "cpu")
    assert all(group["fused"] for group in fused.param_groups)
    plain = torch.optim.AdamW(
        plain_model.optimizer_groups(0.1), lr=1e-2, betas=(0.9, 0.99), foreach=False, fused=False
    )
    x, y = torch.randint(0, 11, (3, 16)), torch.randint(0, 11, (3, 16))
    for _ in range(5):
        for model, optimizer in ((fused_model, fused), (plain_model, plain)):
            optimizer.zero_grad(set_to_none=True)
            model(x, y)[1].backward()
            optimizer.step()
    for a, b in zip(fused_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    decays = {id(p): g["weight_decay"] for g in fused.param_groups for p in g["params"]}
    assert decays[id(fused_model.ln_f.weight)] == 0.0 and decays[id(fused_model.wte.weight)] == 0.1


def test_generated_tokens_can_feed_a_training_step():
    """generate decodes in inference mode; what it returns is a normal tensor that autograd can save."""
    model = tiny_model("rope")
    out = model.generate(torch.zeros(2, 1, dtype=torch.long), 20, generator=torch.Generator().manual_seed(0))
    assert not out.is_inference() and out.shape == (2, 21)
    model.train()
    model(out[:, :-1], out[:, 1:])[1].backward()  # the embedding saves its indices for backward
    assert model.wte.weight.grad is not None


def decode_both_ways(model: DecoderLM, prompt: torch.Tensor, steps: int, device: str, graph: bool = False):
    """Logits of `steps` single-token decoding steps after `prompt`, from decode_step (Python positions,
    narrowed views) and from the static step (tensor positions, masked full window; with graph=True
    captured in a CUDA graph and replayed), each on its own cache."""
    eager_cache, static_cache = (KVCache(model.config, len(prompt), device) for _ in range(2))
    weights = model.decode_weights()
    tokens = torch.randint(0, 11, (len(prompt), steps), generator=torch.Generator().manual_seed(9)).to(device)
    replay = CUDAGraphDecoder(model, static_cache, weights, prompt.size(1) + steps) if graph else None
    model._rope_at(0, prompt.size(1) + steps)  # the static step reads a table grown beforehand
    eager, static = [], []
    with torch.no_grad():
        model(prompt, cache=eager_cache)
        model(prompt, cache=static_cache)
        for t in range(steps):
            token = tokens[:, t : t + 1]
            eager.append(model.decode_step(token, eager_cache, weights))
            if replay is not None:
                static.append(replay(token).clone())
            else:
                position = torch.tensor(static_cache.length, device=device)
                static.append(model._decode(token, static_cache, weights, position))
                static_cache.length += 1
    return torch.stack(eager, 1), torch.stack(static, 1), eager_cache, static_cache


@pytest.mark.parametrize("pos", POSITIONS)
def test_static_decode_step_equals_the_eager_one(pos):
    """The shape-static step (what a CUDA graph captures) against decode_step: rope and none slide 2.5
    windows past the block size; learned and sinusoidal stop at it."""
    model = tiny_model(pos)
    steps = 37 if model.sliding else 13
    prompt = torch.randint(0, 11, (2, 3), generator=torch.Generator().manual_seed(8))
    eager, static, eager_cache, static_cache = decode_both_ways(model, prompt, steps, "cpu")
    torch.testing.assert_close(static, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(static_cache.keys, eager_cache.keys, rtol=1e-5, atol=1e-6)
    assert static_cache.length == eager_cache.length == 3 + steps


def test_cuda_graph_needs_a_cuda_device_and_the_cache():
    model = tiny_model("rope")
    with pytest.raises(ValueError, match="cuda_graph needs use_cache and a CUDA device"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), 5, cuda_graph=True)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        CUDAGraphDecoder(model, KVCache(model.config, 1, "cpu"), model.decode_weights(), 10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("pos", POSITIONS)
def test_cuda_graph_replays_the_decode_step(pos):
    """On a GPU: graph replays give decode_step's logits, and generate draws the same tokens with the
    graph, without it, and without the cache."""
    model = tiny_model(pos).cuda()
    steps = 37 if model.sliding else 13
    prompt = torch.randint(0, 11, (2, 3), generator=torch.Generator().manual_seed(8)).cuda()
    eager, graphed, _, _ = decode_both_ways(model, prompt, steps, "cuda", graph=True)
    torch.testing.assert_close(graphed, eager, rtol=1e-4, atol=1e-4)
    runs = [
        model.generate(
            prompt, 60, top_p=0.9, use_cache=c, generator=torch.Generator("cuda").manual_seed(4), cuda_graph=g
        )
        for c, g in ((True, True), (True, False), (False, None))
    ]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("kw", [{}, {"temperature": 0.0}, {"temperature": 0.7, "top_k": 3}, {"top_p": 0.5}])
def test_cuda_graph_samples_the_tokens_of_eager_decoding(kw):
    """The graph samples in itself from noise drawn outside it: every sampling setting gives the tokens
    of eager cached decoding and of uncached decoding with the same generator, past three windows."""
    model = tiny_model("rope").cuda()
    prompt = torch.randint(0, 11, (3, 2), generator=torch.Generator().manual_seed(2)).cuda()
    runs = [
        model.generate(
            prompt, 50, **kw, use_cache=c, generator=torch.Generator("cuda").manual_seed(5), cuda_graph=g
        )
        for c, g in ((True, True), (True, False), (False, None))
    ]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
