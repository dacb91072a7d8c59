"""PaDiM (Defard et al. 2020, arXiv 2011.08785): pure computation, no file I/O.

The stages the paper separates stay separate here:
features (ResNet18 layer1-3) -> embedding (upsample, concatenate, channel subset) ->
Gaussian statistics per patch position (batch or online) -> Mahalanobis map ->
upsample and blur -> image score (max of the map).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYERS = ("layer1", "layer2", "layer3")
LAYER_CHANNELS = (64, 128, 256)  # ResNet18; 448 channels in all
TOTAL_CHANNELS = sum(LAYER_CHANNELS)
EPSILON = 0.01  # added to every covariance diagonal (paper, Sec. 3.2: "regularisation term eps*I")


@dataclass
class ModelConfig:
    n_features: int = 100  # channels kept from the 448 (paper: random subset, Sec. 4.2)
    resize: int = 224  # shorter side before the centre crop (with crop; paper, Sec. 4.1: 256)
    image_size: int = 224  # model input (square); the embedding grid is image_size / 4 = 56
    crop: bool = False  # False: resize the whole image to image_size (as anomalib); True: resize + crop
    sigma: float = 4.0  # Gaussian blur of the upsampled map (paper, Sec. 4.1)
    epsilon: float = EPSILON

    @property
    def grid(self) -> int:
        return self.image_size // 4  # layer1 has stride 4


def choose_channels(n_features: int, seed: int) -> torch.Tensor:
    """A seeded random subset of the 448 embedding channels, sorted (saved with the model)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(TOTAL_CHANNELS, generator=generator)[:n_features].sort().values


def channel_name(index: int) -> str:
    """'layer2[17]' for embedding channel 81."""
    for layer, start, size in zip(LAYERS, (0, 64, 192), LAYER_CHANNELS):
        if index < start + size:
            return f"{layer}[{index - start}]"
    raise IndexError(index)


def resnet18_backbone(state_dict: dict | None = None) -> nn.Module:
    """torchvision ResNet18; `state_dict=None` keeps torchvision's (globally seeded) random init."""
    model = torchvision.models.resnet18(weights=None)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


class FeatureExtractor(nn.Module):
    """ResNet18 stem + layer1-3; returns the PaDiM embedding of the chosen channels only."""

    def __init__(self, backbone: nn.Module, channels: torch.Tensor):
        super().__init__()
        self.stem = nn.Sequential(backbone.conv1, backbone.bn1, backbone.relu, backbone.maxpool)
        self.layer1, self.layer2, self.layer3 = backbone.layer1, backbone.layer2, backbone.layer3
        self.register_buffer("channels", channels.clone())
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.eval()

    def layer_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images (B, 3, H, W) in [0, 1] -> [(B, 64, H/4, W/4), (B, 128, H/8, W/8), (B, 256, H/16, W/16)]."""
        x = self.stem((images - self.mean) / self.std)
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [f1, f2, f3]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> embedding (B, C, H/4, W/4) of the chosen channels.

        Channels are picked before upsampling, so the 448-channel tensor is never built.
        Nearest upsampling copies each deep patch over the layer1 patches it covers (paper, Sec. 3.1).
        """
        parts = []
        start = 0
        for features, size in zip(self.layer_features(images), LAYER_CHANNELS):
            mask = (self.channels >= start) & (self.channels < start + size)
            chosen = features[:, self.channels[mask] - start]  # (B, c_layer, h, w)
            start += size
            if chosen.shape[1] == 0:
                continue
            grid = images.shape[-2] // 4, images.shape[-1] // 4
            if chosen.shape[-2:] != grid:
                chosen = F.interpolate(chosen, size=grid, mode="nearest")
            parts.append(chosen)
        return torch.cat(parts, dim=1)  # channels stay in sorted index order


# ---------------------------------------------------------------- Gaussian statistics per position


def fit_gaussian_batch(embeddings: torch.Tensor, epsilon: float = EPSILON):
    """The traditional way: all N embeddings at once. (N, C, P) -> mean (C, P), covariance (P, C, C).

    Unbiased covariance (divides by N - 1) + epsilon*I, as in the paper's reference code.
    """
    n = embeddings.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 embeddings to estimate a covariance (got {n})")
    mean = embeddings.mean(dim=0)  # (C, P)
    centred = (embeddings - mean).permute(2, 1, 0)  # (P, C, N)
    covariance = torch.bmm(centred, centred.transpose(1, 2)) / (n - 1)  # (P, C, C)
    covariance.diagonal(dim1=1, dim2=2).add_(epsilon)
    return mean, covariance


class OnlineGaussian:
    """Running mean and covariance per patch position, one batch at a time (Chan et al. 1979 merge).

    Keeps the mean (C, P) in float64 and the centred scatter M2 (P, C, C) in the embedding dtype.
    Each batch is centred on its own float64 mean before the outer products, so a large common
    offset never enters the products (no catastrophic cancellation), and
        M2 <- M2 + Xc Xc^T + (n_a n_b / n) delta delta^T
    is done with two in-place batched matmuls: memory is M2 plus one batch, whatever N is.
    """

    def __init__(self, n_channels: int, n_positions: int, device=None, dtype=torch.float32):
        self.count = 0
        self.mean = torch.zeros(n_channels, n_positions, dtype=torch.float64, device=device)
        self.scatter = torch.zeros(n_positions, n_channels, n_channels, dtype=dtype, device=device)

    def update(self, batch: torch.Tensor) -> None:
        """batch (B, C, P)."""
        n_b = batch.shape[0]
        if n_b == 0:
            return
        batch_mean = batch.mean(dim=0, dtype=torch.float64)  # (C, P)
        centred = (batch.double() - batch_mean).to(self.scatter.dtype)  # (B, C, P)
        centred = centred.permute(2, 1, 0).contiguous()  # (P, C, B)
        self.scatter.baddbmm_(centred, centred.transpose(1, 2))
        n_a = self.count
        if n_a > 0:
            delta = (batch_mean - self.mean).T.to(self.scatter.dtype).unsqueeze(2)  # (P, C, 1)
            self.scatter.baddbmm_(delta, delta.transpose(1, 2), alpha=n_a * n_b / (n_a + n_b))
        self.count = n_a + n_b
        self.mean += (batch_mean - self.mean) * (n_b / self.count)

    def finalize(self, epsilon: float = EPSILON) -> tuple[torch.Tensor, torch.Tensor]:
        """-> mean (C, P), covariance (P, C, C); reuses the scatter's memory (call once)."""
        if self.count < 2:
            raise ValueError(f"need at least 2 embeddings to estimate a covariance (got {self.count})")
        covariance = self.scatter.div_(self.count - 1)
        covariance.diagonal(dim1=1, dim2=2).add_(epsilon)
        self.scatter = None
        return self.mean.to(covariance.dtype), covariance


def invert_covariance_(covariance: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """In place, position chunk by position chunk (Cholesky, then its inverse): (P, C, C) -> inverse.

    Chunking keeps the extra memory at chunk*C*C instead of another P*C*C tensor.
    Cholesky is computed in float64 for stability with near-singular covariances (C > N).
    """
    for start in range(0, covariance.shape[0], chunk):
        block = covariance[start : start + chunk].double()
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(block))
        covariance[start : start + chunk] = inverse.to(covariance.dtype)
    return covariance


# ---------------------------------------------------------------- scoring


def mahalanobis_terms(
    embedding: torch.Tensor, mean: torch.Tensor, inv_covariance: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distance and the whitened residual for every patch of every image, in one batched op.

    embedding (B, C, P), mean (C, P), inv_covariance (P, C, C) ->
    squared distance (B, P) and w = inv_covariance (x - mean) as (B, C, P).
    """
    residual = (embedding - mean).permute(2, 1, 0)  # (P, C, B)
    weighted = torch.bmm(inv_covariance, residual)  # (P, C, B)
    squared = (residual * weighted).sum(dim=1).T  # (B, P)
    return squared, weighted.permute(2, 1, 0)  # (B, P), (B, C, P)


def mahalanobis(embedding: torch.Tensor, mean: torch.Tensor, inv_covariance: torch.Tensor) -> torch.Tensor:
    """(B, C, P) -> distance (B, P)."""
    squared, _ = mahalanobis_terms(embedding, mean, inv_covariance)
    return squared.clamp_min(0).sqrt()


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """1-D kernel truncated at 4 sigma (33 taps for sigma = 4)."""
    radius = int(4 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def smoothing_matrix(grid: int, image_size: int, sigma: float) -> torch.Tensor:
    """(image_size, grid) matrix S with S D S^T = blur(bilinear_upsample(D)) for a (grid, grid) map D.

    Bilinear upsampling, reflect padding and a Gaussian blur are each separable and linear, so their
    composition is one matrix per axis; applying it is two small matmuls instead of a 33x33 convolution
    over the full-size map. Built by running the 1-D operations on the identity.
    """
    identity = torch.eye(grid, dtype=torch.float64).unsqueeze(1)  # (grid, 1, grid): one basis map per row
    rows = F.interpolate(identity, size=image_size, mode="linear", align_corners=False)  # (grid, 1, S)
    kernel = gaussian_kernel(sigma).double()
    radius = kernel.numel() // 2
    rows = F.conv1d(F.pad(rows, (radius, radius), mode="reflect"), kernel.view(1, 1, -1))  # (grid, 1, S)
    return rows[:, 0].T.float()  # (S, grid)


def anomaly_map(distance: torch.Tensor, grid: int, image_size: int, sigma: float) -> torch.Tensor:
    """distance (B, P) with P = grid*grid -> (B, image_size, image_size): bilinear upsample, then blur."""
    smoothing = smoothing_matrix(grid, image_size, sigma).to(distance)  # (S, grid)
    maps = distance.reshape(-1, grid, grid)  # (B, grid, grid)
    return smoothing @ maps @ smoothing.T  # (B, S, S)


def image_scores(maps: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> (B,): the paper's image score is the maximum of the anomaly map."""
    return maps.flatten(1).amax(dim=1)


def permuted_squared_distance(
    squared: torch.Tensor,
    weighted: torch.Tensor,
    inv_diagonal: torch.Tensor,
    embedding: torch.Tensor,
    channel: int,
    order: torch.Tensor,
) -> torch.Tensor:
    """Squared distances after channel `channel` of image i is replaced by that of image order[i].

    Only one coordinate moves (x -> x + d e_c), so d2' = d2 + 2 d w_c + d^2 inv_cov[c, c]: exact, O(B P)
    instead of a new (P, C, C) product per permutation.
    squared (B, P), weighted (B, C, P), inv_diagonal (C, P), embedding (B, C, P), order (R, B) -> (R, B, P).
    """
    values = embedding[:, channel]  # (B, P)
    delta = values[order] - values  # (R, B, P)
    return squared + 2 * delta * weighted[:, channel] + delta.square() * inv_diagonal[channel]


def dropped_channel_squared(squared: torch.Tensor, weighted: torch.Tensor, inv_covariance: torch.Tensor):
    """Exact squared distances of the model refitted without each channel in turn, for every channel.

    Removing channel c from a Gaussian leaves the marginal of the others, whose precision is the Schur
    complement of Lambda_cc; for the quadratic form that means d2' = d2 - w_c^2 / Lambda_cc with
    w = Lambda (x - mu). The epsilon*I regulariser is kept by the marginal too (it is diagonal), so this
    equals refitting without the channel. squared (B, P), weighted (B, C, P), inv_covariance (P, C, C)
    -> (C, B, P).
    """
    inv_diagonal = inv_covariance.diagonal(dim1=1, dim2=2).T  # (C, P)
    return squared.unsqueeze(0) - weighted.transpose(0, 1).square() / inv_diagonal.unsqueeze(1)


def dropped_set_squared(
    squared: torch.Tensor, weighted: torch.Tensor, inv_covariance: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """Exact squared distances without a set S of channels: d2' = d2 - w_S^T (Lambda_SS)^-1 w_S.

    The set version of `dropped_channel_squared` (one batched solve per position); (B, P).
    """
    block = inv_covariance[:, index][:, :, index].double()  # (P, S, S)
    w = weighted[:, index].permute(2, 1, 0).double()  # (P, S, B)
    solved = torch.linalg.solve(block, w)  # (P, S, B)
    return (squared - (w * solved).sum(dim=1).T).to(squared.dtype)


# ---------------------------------------------------------------- metrics


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Area under the ROC curve for each row: scores (..., n), labels (n,) of 0/1 -> (...) float64.

    Mann-Whitney U with average ranks for ties, so it equals sklearn's roc_auc_score. Each row is sorted
    once in its own dtype (numpy's SIMD sort, several times faster than an argsort); the positives' rank
    runs are then found by binary search: first 1-based position `left + 1`, last `right`, average their
    mean. The study calls this for every channel, subset and permutation.
    """
    labels = labels.detach().cpu().numpy().astype(bool).ravel()
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    rows = scores.detach().cpu().numpy().reshape(-1, labels.size)  # (R, n)
    if n_pos == 0 or n_neg == 0:
        return torch.full(scores.shape[:-1], math.nan, dtype=torch.float64)
    area = np.empty(len(rows))
    for i, row in enumerate(rows):
        ordered = np.sort(row)
        positives = np.sort(row[labels])
        left = np.searchsorted(ordered, positives, side="left")  # scores below (ties excluded)
        right = np.searchsorted(ordered, positives, side="right")  # scores at or below
        rank_sum = (left.sum(dtype=np.float64) + right.sum(dtype=np.float64) + n_pos) / 2
        area[i] = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return torch.from_numpy(area).reshape(scores.shape[:-1])


def region_weights(masks: np.ndarray) -> np.ndarray:
    """Weight of every pixel for the per-region overlap: 1 / (|region| * n_regions) inside a defect.

    masks (N, H, W) bool; regions are the 8-connected components of each image's mask (as MVTec AD's
    evaluation code labels them). Normal pixels get 0. Returns (N, H, W) float64.
    """
    from scipy.ndimage import label

    weights = np.zeros(masks.shape, dtype=np.float64)
    sizes = []
    for i, mask in enumerate(masks):
        labels, n = label(mask, structure=np.ones((3, 3), dtype=int))
        if n:
            counts = np.bincount(labels.ravel())
            per_pixel = np.where(labels > 0, 1.0 / counts[labels], 0.0)
            weights[i] = per_pixel
            sizes.append(n)
    n_regions = sum(sizes)
    return weights / n_regions if n_regions else weights


def aupro(maps, masks, fpr_limit: float = 0.3, weights: np.ndarray | None = None) -> float:
    """Area under the per-region-overlap curve up to a false positive rate, divided by that rate.

    MVTec AD's localisation metric (Bergmann et al. 2021): at each threshold, PRO is the mean over all
    defect regions of the share of the region's pixels above the threshold, FPR the share of normal
    pixels above it; the PRO(FPR) curve is integrated (trapezoids) from 0 to `fpr_limit`, interpolating
    at the limit, and normalised so that 1 is perfect. The mean over regions is a weighted count, so
    the curve is one sort of all pixels. maps, masks (N, H, W); `weights` from `region_weights`.
    """
    scores = np.asarray(maps.detach().cpu() if torch.is_tensor(maps) else maps, dtype=np.float64).ravel()
    masks = np.asarray(masks.detach().cpu() if torch.is_tensor(masks) else masks, dtype=bool)
    weights = (region_weights(masks) if weights is None else weights).ravel()
    negative = ~masks.ravel()
    if not negative.any() or weights.sum() == 0:
        return math.nan
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    last_of_tie = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]  # thresholds between distinct scores
    fpr = np.cumsum(negative[order])[last_of_tie] / negative.sum()
    pro = np.cumsum(weights[order])[last_of_tie]
    fpr, pro = np.r_[0.0, fpr], np.r_[0.0, pro]
    inside = fpr <= fpr_limit
    x, y = fpr[inside], pro[inside]
    if x[-1] < fpr_limit:  # interpolate the curve at the limit
        j = int(np.argmax(fpr > fpr_limit))
        t = (fpr_limit - fpr[j - 1]) / (fpr[j] - fpr[j - 1])
        x, y = np.r_[x, fpr_limit], np.r_[y, pro[j - 1] + t * (pro[j] - pro[j - 1])]
    return float(np.trapezoid(y, x) / fpr_limit)
