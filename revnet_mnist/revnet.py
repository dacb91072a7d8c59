"""Reversible residual MLP (Gomez et al. 2017, arXiv 1707.04585) in numpy, with its classic counterparts.

Pure computation: layers with explicit forward/backward, three networks built from the same pieces,
softmax cross-entropy, SGD/Adam and a learning-rate schedule. No autograd, no I/O.

Layer contract: `forward(x, store)` keeps what backward needs only when `store` is true;
`backward(dy)` returns dx, writes the parameter gradients into the preallocated `grads` dict
(keyed like `params`) and drops what forward kept. Gradient buffers, like the parameters and the
optimizer state, live for the whole run, so a training step's transient memory is activations only.

Models (`ModelConfig.model`):
  revnet  stem -> `depth` reversible blocks -> head; backward keeps only the top activation and
          rebuilds each block's input from its output (paper, Algorithm 1).
  resnet  the same network and weights layout, trained with ordinary backprop that stores every
          activation: the classic counterpart.
  mlp     stem -> `depth` x (ReLU, Linear(width, width)) -> head: a plain MLP with the same
          parameter count per block (a block's F and G hold 4 (width/2)^2 = width^2 weights).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np

MODELS = ("revnet", "resnet", "mlp")


@dataclass
class ModelConfig:
    model: str = "revnet"  # revnet | resnet | mlp
    depth: int = 4  # reversible blocks (revnet, resnet) or hidden Linear(width, width) layers (mlp)
    width: int = 256  # features after the stem; a reversible block splits them into two halves
    in_features: int = 784  # 28 x 28 MNIST pixels
    classes: int = 10
    dtype: str = "float32"


# ----------------------------------------------------------------------------- workspace


def _first_refcount(arrays: list) -> int:
    array = arrays[0]  # the same references as in Workspace.take's loop: the list, `array`, the argument
    return sys.getrefcount(array)


class Workspace:
    """Arrays reused from step to step, one free list per (shape, dtype): a warm step allocates nothing.

    `take` hands out an array that nothing outside the workspace refers to (no variable, no stored
    activation, no view of it) and allocates a new one only when every array of that shape is in
    use. Freeing is automatic: an array is free again once its last outside reference is dropped.
    So the workspace holds, per shape, as many arrays as were ever live at once; numpy's allocator
    never sees the variable-sized stream of temporaries that fragments the heap and lets a long
    run's peak RSS creep up epoch after epoch.
    """

    def __init__(self):
        self.arrays: dict[tuple, list[np.ndarray]] = {}
        self.allocations = 0  # arrays ever allocated: constant once every shape in use has been seen
        self._free = _first_refcount([np.empty(0)])  # the count of an array only the workspace holds

    def take(self, shape: tuple, dtype) -> np.ndarray:
        arrays = self.arrays.get((shape, dtype))
        if arrays is None:
            arrays = self.arrays[(shape, dtype)] = []
        for i in range(len(arrays) - 1, -1, -1):  # the most recently used first: likely still in cache
            array = arrays[i]
            if sys.getrefcount(array) == self._free:
                if i != len(arrays) - 1:
                    arrays.append(arrays.pop(i))
                return array
        array = np.empty(shape, dtype)
        arrays.append(array)
        self.allocations += 1
        return array

    def nbytes(self) -> int:
        return sum(a.nbytes for arrays in self.arrays.values() for a in arrays)

    def clear(self) -> None:
        """Drop every array (those still referred to elsewhere live on, outside the workspace)."""
        self.arrays.clear()


# ----------------------------------------------------------------------------- layers


class Linear:
    """y = x W + b, He-initialised; `scale` shrinks the init of a residual branch's last layer."""

    def __init__(
        self,
        fan_in: int,
        fan_out: int,
        rng: np.random.Generator,
        dtype,
        scale: float = 1.0,
        input_grad: bool = True,
        workspace: Workspace | None = None,
    ):
        std = scale * math.sqrt(2.0 / fan_in)  # He et al. 2015, for ReLU inputs
        self.params = {
            "W": (rng.standard_normal((fan_in, fan_out)) * std).astype(dtype),
            "b": np.zeros(fan_out, dtype=dtype),
        }
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.input_grad = input_grad  # the stem's input is the data: no dx needed
        self.workspace = workspace or Workspace()
        self.x = None

    def forward(self, x: np.ndarray, store: bool = True) -> np.ndarray:
        if store:
            self.x = x
        W = self.params["W"]
        y = np.matmul(
            x, W, out=self.workspace.take((len(x), W.shape[1]), np.result_type(x, W))
        )  # (B, fan_out)
        y += self.params["b"]
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray | None:
        np.matmul(self.x.T, dy, out=self.grads["W"])  # (fan_in, fan_out)
        np.sum(dy, axis=0, out=self.grads["b"])
        self.x = None
        if not self.input_grad:
            return None
        W = self.params["W"]
        return np.matmul(dy, W.T, out=self.workspace.take((len(dy), W.shape[0]), np.result_type(dy, W)))


class ReLU:
    params: dict = {}
    grads: dict = {}

    def __init__(self, workspace: Workspace | None = None):
        self.workspace = workspace or Workspace()
        self.y = None

    def forward(self, x: np.ndarray, store: bool = True) -> np.ndarray:
        y = np.maximum(x, 0, out=self.workspace.take(x.shape, x.dtype))
        if store:
            self.y = y  # the output alone gives the mask: y > 0 exactly where x > 0
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        mask = np.greater(self.y, 0, out=self.workspace.take(dy.shape, bool))
        dx = np.multiply(dy, mask, out=self.workspace.take(dy.shape, dy.dtype))
        self.y = None
        return dx


class Sequential:
    def __init__(self, *layers):
        self.layers = list(layers)

    def forward(self, x: np.ndarray, store: bool = True) -> np.ndarray:
        for layer in self.layers:
            x = layer.forward(x, store)
        return x

    def backward(self, dy: np.ndarray) -> np.ndarray:
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy


def branch(features: int, depth: int, rng: np.random.Generator, dtype, workspace: Workspace) -> Sequential:
    """F or G of a reversible block: Linear -> ReLU -> Linear on one half of the features.

    The last layer starts small (1/sqrt(2 depth), two branches per block) so that the sum of
    2 depth residual branches keeps the activations' scale at any depth.
    """
    return Sequential(
        Linear(features, features, rng, dtype, workspace=workspace),
        ReLU(workspace),
        Linear(features, features, rng, dtype, scale=1.0 / math.sqrt(2 * depth), workspace=workspace),
    )


class ReversibleBlock:
    """y1 = x1 + F(x2), y2 = x2 + G(y1); inverse x2 = y2 - G(y1), x1 = y1 - F(x2) (paper, eq. 5-6)."""

    def __init__(
        self, half: int, depth: int, rng: np.random.Generator, dtype, workspace: Workspace | None = None
    ):
        workspace = workspace or Workspace()
        self.F = branch(half, depth, rng, dtype, workspace)
        self.G = branch(half, depth, rng, dtype, workspace)

    # F and G return a fresh workspace array that nothing else holds (their last Linear keeps its
    # input, not its output), so each sum or difference below is written into it in place.

    def forward(self, x1, x2, store: bool = True):
        y1 = self.F.forward(x2, store)
        np.add(x1, y1, out=y1)  # y1 = x1 + F(x2)
        y2 = self.G.forward(y1, store)
        np.add(x2, y2, out=y2)  # y2 = x2 + G(y1)
        return y1, y2

    def inverse(self, y1, y2):
        x2 = self.G.forward(y1, store=False)
        np.subtract(y2, x2, out=x2)  # x2 = y2 - G(y1)
        x1 = self.F.forward(x2, store=False)
        np.subtract(y1, x1, out=x1)  # x1 = y1 - F(x2)
        return x1, x2

    def backward(self, dy1, dy2):
        """Gradients w.r.t. (x1, x2) from those w.r.t. (y1, y2), using what forward(store=True) kept."""
        total = self.G.backward(dy2)
        np.add(dy1, total, out=total)  # total gradient reaching y1: directly and through G
        dx2 = self.F.backward(total)
        np.add(dy2, dx2, out=dx2)
        return total, dx2  # dx1 = total dy1, since y1 = x1 + F(x2)

    def backward_reversible(self, y1, y2, dy1, dy2):
        """Rebuild (x1, x2) from (y1, y2) while recording what backward needs, then backpropagate.

        Returns (x1, x2, dx1, dx2): the block below gets its output and its output's gradient.
        """
        x2 = self.G.forward(y1, store=True)
        np.subtract(y2, x2, out=x2)
        x1 = self.F.forward(x2, store=True)
        np.subtract(y1, x1, out=x1)
        dx1, dx2 = self.backward(dy1, dy2)
        return x1, x2, dx1, dx2


# ----------------------------------------------------------------------------- network


class Network:
    """stem Linear(784, width) -> body -> ReLU -> Linear(width, classes)."""

    def __init__(self, config: ModelConfig, rng: np.random.Generator):
        if config.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS} (got {config.model!r})")
        if config.width < 4 or config.width % 2:
            raise ValueError(f"width must be even and >= 4 (got {config.width})")
        if config.depth < 1:
            raise ValueError(f"depth must be >= 1 (got {config.depth})")
        self.config = config
        dtype = np.dtype(config.dtype)
        width, self.half = config.width, config.width // 2
        self.workspace = ws = Workspace()  # every layer's outputs and gradients, reused step after step
        self.stem = Linear(config.in_features, width, rng, dtype, input_grad=False, workspace=ws)
        if config.model == "mlp":
            self.blocks = [
                Sequential(ReLU(ws), Linear(width, width, rng, dtype, workspace=ws))
                for _ in range(config.depth)
            ]
        else:
            self.blocks = [
                ReversibleBlock(self.half, config.depth, rng, dtype, ws) for _ in range(config.depth)
            ]
        self.head_relu = ReLU(ws)
        self.head = Linear(width, config.classes, rng, dtype, workspace=ws)
        self.top = None  # revnet: the last block's output, the only activation kept for backward
        self.reversible_pass = False  # whether the last forward(train=True) kept only the top

    @property
    def reversible(self) -> bool:
        return self.config.model == "revnet"

    def linears(self) -> dict[str, Linear]:
        """Every Linear layer under a stable name, e.g. 'blocks.3.G.2'."""
        found = {"stem": self.stem, "head": self.head}
        for i, block in enumerate(self.blocks):
            parts = {"F": block.F, "G": block.G} if isinstance(block, ReversibleBlock) else {"": block}
            for part_name, seq in parts.items():
                for j, layer in enumerate(seq.layers):
                    if isinstance(layer, Linear):
                        found[".".join(p for p in ("blocks", str(i), part_name, str(j)) if p)] = layer
        return found

    def parameters(self) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """(name, parameter, gradient buffer) triples, e.g. ('blocks.3.G.2.W', W, dW)."""
        return [
            (f"{name}.{key}", layer.params[key], layer.grads[key])
            for name, layer in self.linears().items()
            for key in layer.params
        ]

    def num_params(self) -> int:
        return sum(p.size for _, p, _ in self.parameters())

    def state_dict(self) -> dict[str, np.ndarray]:
        return {name: p for name, p, _ in self.parameters()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        for name, p, _ in self.parameters():
            if state[name].shape != p.shape:
                raise ValueError(f"{name}: shape {state[name].shape} does not fit {p.shape}")
            p[...] = state[name]

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """Logits (B, classes). `train` keeps what backward needs: everything, or only the top for revnet."""
        self.reversible_pass = train and self.reversible
        h = self.stem.forward(x, store=train)  # (B, width)
        if self.config.model == "mlp":
            for block in self.blocks:
                h = block.forward(h, store=train)
        else:
            x1, x2 = h[:, : self.half], h[:, self.half :]  # two (B, width/2) views
            for block in self.blocks:
                x1, x2 = block.forward(x1, x2, store=train and not self.reversible_pass)
            if self.reversible_pass:
                self.top = (x1, x2)
            h = self._join(x1, x2)  # (B, width)
        return self.head.forward(self.head_relu.forward(h, store=train), store=train)

    def backward(self, dlogits: np.ndarray) -> np.ndarray | None:
        """Fill every Linear's grads from dL/dlogits; call after forward(train=True).

        Returns dL/dx only when `stem.input_grad` is set (tests); training never needs it."""
        dh = self.head_relu.backward(self.head.backward(dlogits))  # (B, width)
        if self.config.model == "mlp":
            for block in reversed(self.blocks):
                dh = block.backward(dh)
        else:
            d1, d2 = dh[:, : self.half], dh[:, self.half :]
            if self.reversible_pass:
                y1, y2 = self.top
                self.top = None
                for block in reversed(self.blocks):
                    y1, y2, d1, d2 = block.backward_reversible(y1, y2, d1, d2)
            else:
                for block in reversed(self.blocks):
                    d1, d2 = block.backward(d1, d2)
            dh = self._join(d1, d2)
        return self.stem.backward(dh)

    def _join(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(B, half) and (B, half) -> (B, width), in a workspace array."""
        return np.concatenate([a, b], axis=1, out=self.workspace.take((len(a), self.config.width), a.dtype))

    def body_forward(self, x1, x2):
        """The reversible stack alone, keeping nothing: (x1, x2) -> (y1, y2)."""
        for block in self.blocks:
            x1, x2 = block.forward(x1, x2, store=False)
        return x1, x2

    def body_inverse(self, y1, y2):
        """Exact inverse of body_forward, block by block from the top."""
        for block in reversed(self.blocks):
            y1, y2 = block.inverse(y1, y2)
        return y1, y2


# ----------------------------------------------------------------------------- loss


def softmax_cross_entropy(
    logits: np.ndarray, labels: np.ndarray, workspace: Workspace | None = None
) -> tuple[float, np.ndarray]:
    """Mean cross-entropy over the batch and its gradient w.r.t. the logits (a `workspace` array)."""
    take = (workspace or Workspace()).take
    (n, classes), dtype = logits.shape, logits.dtype
    column = np.max(logits, axis=1, keepdims=True, out=take((n, 1), dtype))  # (B, 1)
    log_probs = np.subtract(logits, column, out=take((n, classes), dtype))  # stability: exp never overflows
    dlogits = np.exp(log_probs, out=take((n, classes), dtype))
    np.sum(dlogits, axis=1, keepdims=True, out=column)
    np.log(column, out=column)  # log Z
    log_probs -= column  # (B, classes)
    picked = np.multiply(np.arange(n), classes, out=take((n,), np.int64))  # flat index of each label
    picked += labels
    loss = -float(np.take(log_probs.reshape(-1), picked, out=take((n,), dtype)).mean())
    np.exp(log_probs, out=dlogits)
    np.subtract.at(dlogits.reshape(-1), picked, 1)
    dlogits /= n
    return loss, dlogits


# ----------------------------------------------------------------------------- optimisers


class Optimizer:
    """Shared by SGD and Adam: parameters, decoupled weight decay on matrices, one scratch buffer.

    The update runs in place through the scratch buffer, so it allocates nothing per step.
    Weight decay is decoupled (Loshchilov & Hutter 2019): p -= lr * weight_decay * p, on weights only.
    """

    def __init__(self, parameters, weight_decay: float = 0.0):
        self.parameters = parameters
        self.weight_decay = weight_decay
        size = max(p.size for _, p, _ in parameters)
        self.scratch = np.empty(size, dtype=parameters[0][1].dtype)
        self.steps = 0

    def _scratch(self, p: np.ndarray) -> np.ndarray:
        return self.scratch[: p.size].reshape(p.shape)

    def _decay(self, name: str, p: np.ndarray, lr: float) -> None:
        if self.weight_decay and name.endswith(".W"):
            p *= 1 - lr * self.weight_decay

    def state(self) -> dict[str, np.ndarray]:
        return {}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        for key, value in self.state().items():
            value[...] = state[key]
        self.steps = int(state.get("steps", self.steps))


class SGD(Optimizer):
    """Heavy-ball momentum: v = momentum v + g; p -= lr v."""

    def __init__(self, parameters, momentum: float = 0.9, weight_decay: float = 0.0):
        super().__init__(parameters, weight_decay)
        self.momentum = momentum
        self.velocity = [np.zeros_like(p) for _, p, _ in parameters]

    def step(self, lr: float) -> None:
        self.steps += 1
        for (name, p, g), v in zip(self.parameters, self.velocity):
            self._decay(name, p, lr)
            v *= self.momentum
            v += g
            s = self._scratch(p)
            np.multiply(v, lr, out=s)
            p -= s

    def state(self) -> dict[str, np.ndarray]:
        return {f"velocity.{name}": v for (name, _, _), v in zip(self.parameters, self.velocity)}


class Adam(Optimizer):
    """Kingma & Ba 2015, with bias correction; betas and eps are the paper's defaults."""

    def __init__(self, parameters, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(parameters, weight_decay)
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.m = [np.zeros_like(p) for _, p, _ in parameters]
        self.v = [np.zeros_like(p) for _, p, _ in parameters]

    def step(self, lr: float) -> None:
        self.steps += 1
        correction1 = 1 - self.beta1**self.steps
        correction2 = 1 - self.beta2**self.steps
        for (name, p, g), m, v in zip(self.parameters, self.m, self.v):
            self._decay(name, p, lr)
            s = self._scratch(p)
            m *= self.beta1
            np.multiply(g, 1 - self.beta1, out=s)
            m += s
            v *= self.beta2
            np.multiply(g, g, out=s)
            s *= 1 - self.beta2
            v += s
            np.sqrt(v, out=s)  # s = sqrt(v_hat) + eps, with v_hat = v / correction2
            s *= 1 / math.sqrt(correction2)
            s += self.eps
            np.divide(m, s, out=s)
            s *= lr / correction1
            p -= s

    def state(self) -> dict[str, np.ndarray]:
        out = {}
        for (name, _, _), m, v in zip(self.parameters, self.m, self.v):
            out[f"m.{name}"], out[f"v.{name}"] = m, v
        return out


def learning_rate(step: int, total_steps: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warmup to base_lr, then cosine decay to zero at total_steps."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * base_lr * (1 + math.cos(math.pi * min(1.0, progress)))


CHECK_BATCH = 32  # images in train.py's per-epoch reversibility check (its stored pass costs memory)


def reversibility_check(network: Network, x: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """How faithful the reversible backward is on one batch, with the network's current weights.

    rebuild_error: max |x' - x| / max |x| between the stack's input rebuilt by the reversible
    backward and the input the forward pass computed. grad_error: ||g_rev - g|| / ||g|| over all
    parameters as one vector, g from stored-activation backprop. One forward stores every
    activation of the (small) batch; then both backward passes walk down the stack side by side:
    each block is backpropagated through its stored activations, its gradients copied (one block's
    worth, never all of them), then rebuilt from its output and backpropagated reversibly. Call
    between training steps: it overwrites the gradient buffers (the optimizer reads them only in `step`).
    """
    if network.config.model == "mlp":
        raise ValueError("reversibility_check needs reversible blocks (revnet or resnet)")
    half = network.half
    h = network.stem.forward(x, store=True)  # the stack's input; nothing below writes into it
    x1, x2 = h[:, :half], h[:, half:]
    for block in network.blocks:
        x1, x2 = block.forward(x1, x2, store=True)
    top = network.head_relu.forward(np.concatenate([x1, x2], axis=1), store=True)
    dlogits = softmax_cross_entropy(network.head.forward(top, store=True), labels)[1]
    dh = network.head_relu.backward(network.head.backward(dlogits))  # the same in both passes
    sums = {
        "diff": 0.0,
        "norm": sum(float(np.sum(np.square(g, dtype=np.float64))) for g in network.head.grads.values()),
    }

    def compare(layers, stored):
        for layer, g_stored in zip(layers, stored):
            for key, g in layer.grads.items():
                sums["diff"] += float(np.sum(np.square(g - g_stored[key], dtype=np.float64)))
                sums["norm"] += float(np.sum(np.square(g_stored[key], dtype=np.float64)))

    s1, s2 = r1, r2 = dh[:, :half], dh[:, half:]  # gradients: stored pass (s), reversible pass (r)
    for block in reversed(network.blocks):
        s1, s2 = block.backward(s1, s2)
        layers = [layer for seq in (block.F, block.G) for layer in seq.layers if isinstance(layer, Linear)]
        stored = [{k: g.copy() for k, g in layer.grads.items()} for layer in layers]
        x1, x2, r1, r2 = block.backward_reversible(x1, x2, r1, r2)
        compare(layers, stored)
    scale = float(np.abs(h).max()) or 1.0
    rebuild_error = max(float(np.abs(x1 - h[:, :half]).max()), float(np.abs(x2 - h[:, half:]).max())) / scale
    kept_input = network.stem.x
    network.stem.backward(np.concatenate([s1, s2], axis=1))
    stored = [{k: g.copy() for k, g in network.stem.grads.items()}]
    network.stem.x = kept_input
    network.stem.backward(np.concatenate([r1, r2], axis=1))
    compare([network.stem], stored)
    return {"rebuild_error": rebuild_error, "grad_error": (sums["diff"] / (sums["norm"] or 1.0)) ** 0.5}


def held_bytes(network: Network) -> int:
    """Bytes of the arrays the network holds for backward right now (each array counted once)."""
    held = {}
    for layer in network.linears().values():
        if layer.x is not None:
            held[id(layer.x)] = layer.x
    relus = [network.head_relu] + [
        layer for block in network.blocks for seq in _branches(block) for layer in seq.layers
    ]
    for layer in relus:
        if isinstance(layer, ReLU) and layer.y is not None:
            held[id(layer.y)] = layer.y
    for array in network.top or ():
        held[id(array)] = array
    return sum(a.nbytes for a in held.values())


def _branches(block) -> tuple:
    return (block.F, block.G) if isinstance(block, ReversibleBlock) else (block,)


def train_step(
    network: Network, optimizer: Optimizer, x: np.ndarray, labels: np.ndarray, lr: float, after_forward=None
) -> tuple[float, int]:
    """One forward, backward and update; returns (loss, correct predictions in the batch).

    `after_forward(network)`, if given, runs between forward and backward (memory accounting)."""
    logits = network.forward(x, train=True)
    if after_forward is not None:
        after_forward(network)
    loss, dlogits = softmax_cross_entropy(logits, labels, network.workspace)
    correct = int((logits.argmax(axis=1) == labels).sum())
    del logits
    network.backward(dlogits)
    optimizer.step(lr)
    return loss, correct
