"""revnet_mnist/revnet.py against independent oracles: central finite differences in float64, torch
autograd, hand-computed cases; the reversible block's exact inverse; and measured step memory."""

import importlib.util
import math
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

REVNET = Path(__file__).resolve().parent.parent / "revnet_mnist"
sys.path.insert(0, str(REVNET))
from revnet import (  # noqa: E402
    MODELS,
    SGD,
    Adam,
    Linear,
    ModelConfig,
    Network,
    ReLU,
    ReversibleBlock,
    held_bytes,
    learning_rate,
    reversibility_check,
    softmax_cross_entropy,
    train_step,
)

EPS = 1e-6  # finite-difference step in float64


def numeric_grad(loss_fn, array: np.ndarray) -> np.ndarray:
    """Central differences of the scalar loss_fn() w.r.t. every element of `array` (perturbed in place)."""
    grad = np.zeros_like(array)
    flat, gflat = array.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + EPS
        up = loss_fn()
        flat[i] = old - EPS
        down = loss_fn()
        flat[i] = old
        gflat[i] = (up - down) / (2 * EPS)
    return grad


def assert_close(analytic, numeric, rtol=1e-6, atol=1e-8):
    np.testing.assert_allclose(analytic, numeric, rtol=rtol, atol=atol)


def tiny_config(model: str, depth: int = 2, dtype: str = "float64") -> ModelConfig:
    return ModelConfig(model=model, depth=depth, width=6, in_features=7, classes=4, dtype=dtype)


def batch(rng, n=5, features=7, classes=4):
    return rng.standard_normal((n, features)), rng.integers(0, classes, n)


# ----------------------------------------------------------------------------- layers and loss


def test_linear_and_relu_gradients_match_finite_differences():
    rng = np.random.default_rng(0)
    linear, relu = Linear(5, 3, rng, np.float64), ReLU()
    linear.params["b"][:] = rng.standard_normal(3)
    x, weights = rng.standard_normal((4, 5)), rng.standard_normal((4, 3))

    def loss():
        return float((relu.forward(linear.forward(x, store=False), store=False) * weights).sum())

    relu.forward(linear.forward(x))
    dx = linear.backward(relu.backward(weights))
    assert_close(dx, numeric_grad(loss, x))
    for key in ("W", "b"):
        assert_close(linear.grads[key], numeric_grad(loss, linear.params[key]))
    assert linear.x is None and relu.y is None  # backward drops what forward kept


def test_softmax_cross_entropy_hand_case_and_finite_differences():
    loss, dlogits = softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 2]))
    assert loss == pytest.approx(math.log(3))  # uniform over 3 classes
    np.testing.assert_allclose(dlogits, np.array([[-2, 1, 1], [1, 1, -2]]) / 6)
    rng = np.random.default_rng(1)
    logits, labels = 50 * rng.standard_normal((4, 5)), rng.integers(0, 5, 4)  # large: needs the max shift
    _, dlogits = softmax_cross_entropy(logits, labels)
    assert_close(dlogits, numeric_grad(lambda: softmax_cross_entropy(logits, labels)[0], logits))


def block_loss_setup(seed=2, half=3, n=4):
    rng = np.random.default_rng(seed)
    block = ReversibleBlock(half, depth=1, rng=rng, dtype=np.float64)
    for seq in (block.F, block.G):  # non-zero biases so every gradient term is exercised
        for layer in seq.layers:
            if isinstance(layer, Linear):
                layer.params["b"][:] = 0.3 * rng.standard_normal(half)
    x1, x2 = rng.standard_normal((n, half)), rng.standard_normal((n, half))
    r1, r2 = rng.standard_normal((n, half)), rng.standard_normal((n, half))  # loss = <y1, r1> + <y2, r2>
    return block, x1, x2, r1, r2


def test_reversible_block_gradients_match_finite_differences_both_ways():
    block, x1, x2, r1, r2 = block_loss_setup()

    def loss():
        y1, y2 = block.forward(x1, x2, store=False)
        return float((y1 * r1).sum() + (y2 * r2).sum())

    numeric = {"x1": numeric_grad(loss, x1), "x2": numeric_grad(loss, x2)}
    linears = [layer for seq in (block.F, block.G) for layer in seq.layers if isinstance(layer, Linear)]
    numeric_params = [{k: numeric_grad(loss, layer.params[k]) for k in layer.params} for layer in linears]

    block.forward(x1, x2, store=True)  # stored activations
    dx1, dx2 = block.backward(r1.copy(), r2.copy())
    assert_close(dx1, numeric["x1"])
    assert_close(dx2, numeric["x2"])
    for layer, expected in zip(linears, numeric_params):
        for key in layer.params:
            assert_close(layer.grads[key], expected[key])

    y1, y2 = block.forward(x1, x2, store=False)  # reversible: nothing kept, input rebuilt
    rx1, rx2, dx1, dx2 = block.backward_reversible(y1, y2, r1.copy(), r2.copy())
    np.testing.assert_allclose(rx1, x1, rtol=0, atol=1e-13)
    np.testing.assert_allclose(rx2, x2, rtol=0, atol=1e-13)
    assert_close(dx1, numeric["x1"])
    assert_close(dx2, numeric["x2"])
    for layer, expected in zip(linears, numeric_params):
        for key in layer.params:
            assert_close(layer.grads[key], expected[key])


@pytest.mark.parametrize("depth", [1, 3, 8])
def test_inverse_of_forward_is_identity(depth):
    rng = np.random.default_rng(depth)
    net = Network(ModelConfig("revnet", depth=depth, width=16, in_features=7), rng)
    x1, x2 = rng.standard_normal((5, 8)), rng.standard_normal((5, 8))
    y1, y2 = net.body_forward(x1, x2)
    assert np.abs(y1 - x1).max() > 1e-2  # the blocks do change their input
    r1, r2 = net.body_inverse(y1, y2)
    np.testing.assert_allclose(r1, x1, rtol=0, atol=1e-12)
    np.testing.assert_allclose(r2, x2, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- whole networks


def network_grads(net: Network, x, labels) -> dict[str, np.ndarray]:
    net.stem.input_grad = True
    _, dlogits = softmax_cross_entropy(net.forward(x, train=True), labels)
    grads = {"input": net.backward(dlogits)}
    grads.update({name: g.copy() for name, _, g in net.parameters()})
    return grads


@pytest.mark.parametrize("model", MODELS)
def test_network_gradients_match_finite_differences(model):
    rng = np.random.default_rng(3)
    net = Network(tiny_config(model), rng)
    for _, p, _ in net.parameters():
        if p.ndim == 1:
            p[:] = 0.2 * rng.standard_normal(p.shape)
    x, labels = batch(rng)
    analytic = network_grads(net, x, labels)

    def loss():
        return softmax_cross_entropy(net.forward(x, train=False), labels)[0]

    assert_close(analytic["input"], numeric_grad(loss, x))
    for name, p, _ in net.parameters():
        assert_close(analytic[name], numeric_grad(loss, p), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("depth", [1, 4, 16])
def test_reversible_gradients_equal_stored_activation_gradients(depth):
    rng = np.random.default_rng(4)
    config = ModelConfig("resnet", depth=depth, width=32, in_features=20, classes=10)
    x, labels = batch(rng, n=16, features=20, classes=10)
    for dtype, tolerance in (("float64", 1e-10), ("float32", 1e-4)):
        config.dtype = dtype
        resnet = Network(config, np.random.default_rng(5))
        revnet = Network(ModelConfig(**{**config.__dict__, "model": "revnet"}), np.random.default_rng(6))
        revnet.load_state_dict(resnet.state_dict())
        expected = network_grads(resnet, x.astype(dtype), labels)
        got = network_grads(revnet, x.astype(dtype), labels)
        for name, g in expected.items():
            error = np.linalg.norm(got[name] - g) / np.linalg.norm(g)
            assert error <= tolerance, (dtype, name, error)


def torch_forward(net: Network, x: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """The same network written with torch ops on the same weights, for autograd."""

    def linear(name, h):
        return h @ weights[f"{name}.W"] + weights[f"{name}.b"]

    h = linear("stem", x)
    if net.config.model == "mlp":
        for i in range(net.config.depth):
            h = linear(f"blocks.{i}.1", torch.relu(h))
    else:
        x1, x2 = h[:, : net.half], h[:, net.half :]
        for i in range(net.config.depth):
            x1 = x1 + linear(f"blocks.{i}.F.2", torch.relu(linear(f"blocks.{i}.F.0", x2)))
            x2 = x2 + linear(f"blocks.{i}.G.2", torch.relu(linear(f"blocks.{i}.G.0", x1)))
        h = torch.cat([x1, x2], dim=1)
    return linear("head", torch.relu(h))


@pytest.mark.parametrize("model", MODELS)
def test_network_gradients_match_torch_autograd(model):
    rng = np.random.default_rng(7)
    net = Network(ModelConfig(model, depth=3, width=24, in_features=30, classes=10, dtype="float64"), rng)
    x, labels = batch(rng, n=12, features=30, classes=10)
    ours = network_grads(net, x, labels)
    weights = {name: torch.tensor(p, requires_grad=True) for name, p, _ in net.parameters()}
    x_t = torch.tensor(x, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(torch_forward(net, x_t, weights), torch.tensor(labels))
    loss.backward()
    ours_loss = softmax_cross_entropy(net.forward(x, train=False), labels)[0]
    assert loss.item() == pytest.approx(ours_loss, rel=1e-12)
    np.testing.assert_allclose(ours["input"], x_t.grad.numpy(), rtol=1e-9, atol=1e-12)
    for name, w in weights.items():
        np.testing.assert_allclose(ours[name], w.grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=name)


def test_models_share_the_parameter_budget_and_validate_config():
    rng = np.random.default_rng(8)
    counts = {m: Network(ModelConfig(m, depth=4, width=64), rng).num_params() for m in MODELS}
    assert counts["revnet"] == counts["resnet"]
    assert abs(counts["mlp"] - counts["revnet"]) / counts["revnet"] < 0.02  # "a plain MLP of similar size"
    for bad in ({"width": 7}, {"width": 2}, {"depth": 0}, {"model": "cnn"}):
        with pytest.raises(ValueError):
            Network(ModelConfig(**bad), rng)


# ----------------------------------------------------------------------------- optimisers and schedule


def test_adam_matches_torch_adamw_with_decay_on_weights_only():
    rng = np.random.default_rng(9)
    net = Network(tiny_config("resnet"), rng)
    params = net.parameters()
    adam = Adam(params, weight_decay=0.1)
    tensors = {name: torch.tensor(p.copy(), requires_grad=True) for name, p, _ in params}
    torch_adam = torch.optim.AdamW(
        [
            {"params": [t for n, t in tensors.items() if n.endswith(".W")]},
            {"params": [t for n, t in tensors.items() if n.endswith(".b")], "weight_decay": 0.0},
        ],
        lr=0.01,
        weight_decay=0.1,
    )
    for _ in range(3):
        for name, p, g in params:
            g[...] = rng.standard_normal(p.shape)
            tensors[name].grad = torch.tensor(g.copy())
        adam.step(0.01)
        torch_adam.step()
    for name, p, _ in params:
        np.testing.assert_allclose(p, tensors[name].detach().numpy(), rtol=1e-10, atol=1e-12, err_msg=name)


def test_sgd_momentum_matches_torch_and_decay_is_decoupled():
    rng = np.random.default_rng(10)
    p = rng.standard_normal((3, 4))
    g = np.zeros_like(p)
    sgd = SGD([("x.W", p, g)], momentum=0.9)
    t = torch.tensor(p.copy(), requires_grad=True)
    torch_sgd = torch.optim.SGD([t], lr=0.1, momentum=0.9)
    for _ in range(3):
        g[...] = rng.standard_normal(p.shape)
        t.grad = torch.tensor(g.copy())
        sgd.step(0.1)
        torch_sgd.step()
    np.testing.assert_allclose(p, t.detach().numpy(), rtol=1e-12)
    # with zero gradient and no velocity, one step only shrinks the weights: p <- p (1 - lr wd)
    q, zero = rng.standard_normal(5), np.zeros(5)
    before = q.copy()
    SGD([("y.W", q, zero)], momentum=0.9, weight_decay=0.5).step(0.1)
    np.testing.assert_allclose(q, before * (1 - 0.1 * 0.5))


def test_learning_rate_schedule_hand_values():
    assert learning_rate(0, 100, 1.0, 10) == pytest.approx(0.1)  # warmup: (step + 1) / warmup
    assert learning_rate(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert learning_rate(10, 100, 1.0, 10) == pytest.approx(1.0)  # cosine starts at the peak
    assert learning_rate(55, 100, 1.0, 10) == pytest.approx(0.5)  # halfway through the decay
    assert learning_rate(100, 100, 1.0, 10) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(0, 100, 2.0, 0) == pytest.approx(2.0)


def test_training_steps_reduce_the_loss():
    rng = np.random.default_rng(11)
    x, labels = batch(rng, n=32, features=7, classes=4)
    for model in MODELS:
        config = ModelConfig(model, depth=2, width=16, in_features=7, classes=4)
        net = Network(config, np.random.default_rng(0))
        adam = Adam(net.parameters())
        first = train_step(net, adam, x.astype(np.float32), labels, 1e-2)[0]
        for _ in range(100):
            last = train_step(net, adam, x.astype(np.float32), labels, 1e-2)[0]
        assert last < 0.3 * first, (model, first, last)


# ----------------------------------------------------------------------------- memory


def traced_step_peaks(model: str, depth: int, steps: int = 3) -> list[int]:
    """Peak bytes each of `steps` training steps allocates above what was held before it (tracemalloc)."""
    rng = np.random.default_rng(12)
    net = Network(ModelConfig(model, depth=depth, width=256, in_features=32, classes=10), rng)
    adam = Adam(net.parameters())
    x, labels = rng.standard_normal((256, 32)).astype(np.float32), rng.integers(0, 10, 256)
    peaks = []
    tracemalloc.start()
    for _ in range(steps):
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        train_step(net, adam, x, labels, 1e-3)
        peaks.append(tracemalloc.get_traced_memory()[1] - held)
    tracemalloc.stop()
    return peaks


def test_reversible_step_memory_is_flat_in_depth_while_stored_backprop_grows():
    # the first step fills the network's workspace: its peak is the step's working set
    revnet = {d: traced_step_peaks("revnet", d, 1)[0] for d in (2, 6)}
    resnet = {d: traced_step_peaks("resnet", d, 1)[0] for d in (2, 6)}
    activation = 256 * 128 * 4  # one (batch, width/2) float32 array
    assert abs(revnet[6] - revnet[2]) < 0.05 * revnet[2]
    # stored backprop keeps ~4 such arrays per block (two ReLU outputs, y1, y2)
    assert resnet[6] - resnet[2] > 4 * 3 * activation
    assert revnet[6] < 0.6 * resnet[6]


@pytest.mark.parametrize("model", MODELS)
def test_warm_steps_and_evaluation_reuse_the_workspace(model):
    """After the first step, training and evaluation allocate no activation-sized array: a long run's
    memory cannot creep up through the allocator (the workspace's arrays are reused, one per shape)."""
    activation = 256 * 128 * 4  # one (batch, width/2) float32 array
    cold, *warm = traced_step_peaks(model, 3, steps=3)
    assert cold > 8 * activation
    assert max(warm) < activation / 2
    rng = np.random.default_rng(16)
    net = Network(ModelConfig(model, depth=3, width=16, in_features=7, classes=4), rng)
    adam = Adam(net.parameters())
    x, labels = rng.standard_normal((32, 7)).astype(np.float32), rng.integers(0, 4, 32)
    train_step(net, adam, x, labels, 1e-3)
    net.forward(x[:10], train=False)  # an evaluation batch of another size gets arrays of its own
    allocated = net.workspace.allocations
    for _ in range(3):
        train_step(net, adam, x, labels, 1e-3)
        net.forward(x[:10], train=False)
    assert net.workspace.allocations == allocated


def test_workspace_never_hands_out_an_array_still_in_use():
    from revnet import Workspace

    ws = Workspace()
    a = ws.take((4, 3), np.float32)
    view = ws.take((4, 3), np.float32)[:, 1:]  # only a view of the second array survives
    third = ws.take((4, 3), np.float32)
    in_use = third is a or np.shares_memory(third, view)
    assert not in_use and ws.allocations == 3
    del a, third
    again = ws.take((4, 3), np.float32)  # a's or third's array: free again, nothing allocated
    assert ws.allocations == 3 and not np.shares_memory(again, view)
    assert ws.take((4, 3), np.float64).dtype == np.float64 and ws.allocations == 4


# ----------------------------------------------------------------------------- reversibility under training


def test_reversibility_check_matches_an_independent_rebuild_and_leaves_weights_alone():
    rng = np.random.default_rng(13)
    net = Network(ModelConfig("revnet", depth=6, width=32, in_features=20, classes=10), rng)
    x, labels = batch(rng, n=64, features=20, classes=10)
    x = x.astype(np.float32)
    weights = {k: v.copy() for k, v in net.state_dict().items()}
    check = reversibility_check(net, x, labels)
    h = net.stem.forward(x, store=False)  # oracle: invert the stack by hand, outside backward
    r1, r2 = net.body_inverse(*net.body_forward(h[:, :16], h[:, 16:]))
    by_hand = np.abs(np.concatenate([r1, r2], axis=1) - h).max() / np.abs(h).max()
    assert 0 < check["rebuild_error"] < 1e-5 and check["rebuild_error"] == pytest.approx(by_hand, rel=0.5)
    assert 0 < check["grad_error"] < 1e-5
    assert all(np.array_equal(weights[k], v) for k, v in net.state_dict().items())
    assert held_bytes(net) == 0  # nothing left held for a backward that will not come


def expansive(net: Network, factor: float) -> Network:
    for block in net.blocks:
        for seq in (block.F, block.G):
            for layer in seq.layers:
                if isinstance(layer, Linear):
                    layer.params["W"] *= factor
    return net


def test_expansive_branches_break_the_rebuild_and_train_warns_in_one_line():
    spec = importlib.util.spec_from_file_location("revnet_train", REVNET / "train.py")
    train = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = train
    spec.loader.exec_module(train)
    rng = np.random.default_rng(14)
    x, labels = batch(rng, n=64, features=20, classes=10)
    config = ModelConfig("revnet", depth=8, width=32, in_features=20, classes=10)
    healthy = reversibility_check(Network(config, np.random.default_rng(0)), x.astype(np.float32), labels)
    broken = reversibility_check(
        expansive(Network(config, np.random.default_rng(0)), 4.0), x.astype(np.float32), labels
    )
    tolerance = 1e4 * float(np.finfo(np.float32).eps)  # train.py's default in float32
    assert healthy["rebuild_error"] < tolerance < broken["rebuild_error"]
    assert train.rebuild_warning(healthy, tolerance, epoch=3) is None
    warning = train.rebuild_warning(broken, tolerance, epoch=3)
    assert "\n" not in warning and warning.startswith("warning: epoch 3")
    assert "--lr" in warning and "float64" in warning


def test_held_bytes_counts_what_backward_keeps():
    rng = np.random.default_rng(15)
    n, width, depth = 32, 16, 5
    x = rng.standard_normal((n, 20)).astype(np.float32)
    held = {}
    for model in ("revnet", "resnet"):
        net = Network(ModelConfig(model, depth=depth, width=width, in_features=20, classes=10), rng)
        net.forward(x, train=True)
        held[model] = held_bytes(net)
    row = 4 * n  # bytes per feature column of a float32 (n, .) array
    # both: the input (20 columns) and the head's ReLU output (width). revnet: only the top, y1 and y2
    # of the last block (width). resnet: every block's input x2 (the stem's half for the first) and
    # per block 2 ReLU outputs, y1 and (but the last's, which no block reads) y2: 4 x width/2 each
    assert held["revnet"] == row * (20 + width + width)
    assert held["resnet"] == row * (20 + width + depth * 2 * width)
