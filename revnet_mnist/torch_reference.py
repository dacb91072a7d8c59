"""revnet.Network(model='resnet') in torch: the speed reference of benchmark.py (imported only there)."""

from __future__ import annotations

import torch
from revnet import Network


class TorchResNet(torch.nn.Module):
    """stem, y1 = x1 + F(x2), y2 = x2 + G(y1), ReLU, head, starting from a numpy network's weights."""

    def __init__(self, network: Network):
        super().__init__()
        config = network.config

        def linear(layer):
            module = torch.nn.Linear(*layer.params["W"].shape)
            with torch.no_grad():
                module.weight.copy_(torch.from_numpy(layer.params["W"].T.copy()))
                module.bias.copy_(torch.from_numpy(layer.params["b"]))
            return module

        def branch(seq):
            return torch.nn.Sequential(linear(seq.layers[0]), torch.nn.ReLU(), linear(seq.layers[2]))

        self.half = config.width // 2
        self.stem, self.head = linear(network.stem), linear(network.head)
        self.F = torch.nn.ModuleList(branch(block.F) for block in network.blocks)
        self.G = torch.nn.ModuleList(branch(block.G) for block in network.blocks)

    def forward(self, x):
        x1, x2 = self.stem(x).split(self.half, dim=1)  # two (B, width/2)
        for F, G in zip(self.F, self.G):
            x1 = x1 + F(x2)
            x2 = x2 + G(x1)
        return self.head(torch.relu(torch.cat([x1, x2], dim=1)))


class TorchStep:
    """One AdamW training step of the torch reference on a given batch."""

    def __init__(self, network: Network, lr: float, weight_decay: float, threads: int):
        torch.set_num_threads(threads)
        self.model = TorchResNet(network)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=weight_decay)

    def __call__(self, x, labels) -> None:
        self.optimizer.zero_grad()
        torch.nn.functional.cross_entropy(
            self.model(torch.from_numpy(x)), torch.from_numpy(labels)
        ).backward()
        self.optimizer.step()
