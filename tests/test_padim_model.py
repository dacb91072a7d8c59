"""PaDiM's numerical pieces against independent oracles (numpy, scipy, sklearn, plain recomputation)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter1d
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "padim_anomaly"))

import padim  # noqa: E402


def numpy_gaussian(embeddings: np.ndarray, epsilon: float):
    """Oracle: np.cov per position in float64. embeddings (N, C, P)."""
    mean = embeddings.mean(axis=0)
    cov = np.stack([np.cov(embeddings[:, :, p], rowvar=False) for p in range(embeddings.shape[2])])
    return mean, cov + epsilon * np.eye(embeddings.shape[1])


def relative(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def test_online_fit_recovers_a_known_gaussian():
    rng = np.random.default_rng(0)
    n, c, p = 20000, 3, 4
    true_mean = rng.normal(size=(c, p)) * 3
    factors = rng.normal(size=(p, c, c))
    true_cov = factors @ factors.transpose(0, 2, 1) + 0.5 * np.eye(c)  # (P, C, C)
    z = rng.normal(size=(n, p, c))
    samples = np.einsum("pij,npj->nip", np.linalg.cholesky(true_cov), z) + true_mean  # (N, C, P)
    stats = padim.OnlineGaussian(c, p)
    for chunk in np.array_split(samples, 37):
        stats.update(torch.from_numpy(chunk).float())
    mean, cov = stats.finalize(epsilon=0.0)
    # sampling error of a mean is ~ sigma / sqrt(n) = 0.01 sigma; of a covariance ~ sqrt(2 / n)
    assert np.abs(mean.numpy() - true_mean).max() < 0.05 * np.sqrt(true_cov.diagonal(axis1=1, axis2=2).max())
    assert relative(cov.numpy(), true_cov) < 0.05


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_online_and_batch_match_the_float64_oracle(offset):
    rng = np.random.default_rng(1)
    scales = rng.uniform(0.1, 3, size=(1, 6, 1))
    embeddings = (rng.normal(size=(53, 6, 10)) * scales + offset).astype(np.float32)
    oracle_mean, oracle_cov = numpy_gaussian(embeddings.astype(np.float64), padim.EPSILON)
    stats = padim.OnlineGaussian(6, 10)
    for start, stop in ((0, 1), (1, 17), (17, 20), (20, 53)):  # uneven batches, one of a single image
        stats.update(torch.from_numpy(embeddings[start:stop]))
    online_mean, online_cov = stats.finalize()
    batch_mean, batch_cov = padim.fit_gaussian_batch(torch.from_numpy(embeddings))
    assert relative(online_mean, oracle_mean) <= 1e-6
    assert relative(online_cov, oracle_cov) <= 1e-5
    assert relative(online_mean, batch_mean) <= 1e-5
    if offset == 0.0:  # the float32 batch formula is the one that loses digits to a large mean
        assert relative(batch_cov, oracle_cov) <= 1e-5
        assert relative(online_cov, batch_cov) <= 1e-5


def test_mahalanobis_matches_scipy_and_is_zero_at_the_mean():
    rng = np.random.default_rng(2)
    embeddings = torch.from_numpy(rng.normal(size=(40, 5, 3))).float()
    mean, cov = padim.fit_gaussian_batch(embeddings)
    inverse = padim.invert_covariance_(cov.clone())
    assert torch.allclose(inverse, torch.linalg.inv(cov), rtol=1e-4, atol=1e-5)
    queries = torch.from_numpy(rng.normal(size=(4, 5, 3))).float()
    distance = padim.mahalanobis(queries, mean, inverse)  # (B, P)
    for b in range(4):
        for p in range(3):
            expected = scipy_mahalanobis(queries[b, :, p].double(), mean[:, p].double(), inverse[p].double())
            assert distance[b, p].item() == pytest.approx(expected, rel=1e-4)
    assert padim.mahalanobis(mean.unsqueeze(0), mean, inverse).abs().max() < 1e-3
    direction = torch.from_numpy(rng.normal(size=(5, 3))).float()
    scaled = torch.stack([mean + t * direction for t in (0.5, 1.0, 2.0, 4.0)])
    d = padim.mahalanobis(scaled, mean, inverse)  # (4, P): linear in the offset
    assert torch.allclose(d, torch.tensor([0.5, 1.0, 2.0, 4.0]).view(4, 1) * d[1], rtol=1e-4)


def test_anomaly_map_is_upsample_then_gaussian_blur():
    rng = np.random.default_rng(3)
    distance = torch.from_numpy(rng.uniform(size=(2, 16 * 16))).float()
    maps = padim.anomaly_map(distance, grid=16, image_size=64, sigma=4.0)
    upsampled = (
        F.interpolate(distance.view(2, 1, 16, 16), size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
        .double()
        .numpy()
    )
    # scipy's 'mirror' is torch's 'reflect'; truncate=4 gives the same 33-tap kernel
    expected = gaussian_filter1d(
        gaussian_filter1d(upsampled, 4.0, axis=1, mode="mirror", truncate=4.0),
        4.0,
        axis=2,
        mode="mirror",
        truncate=4.0,
    )
    assert np.abs(maps.numpy() - expected).max() < 1e-5
    assert torch.equal(padim.image_scores(maps), maps.flatten(1).max(dim=1).values)


def test_auroc_matches_sklearn_with_and_without_ties():
    rng = np.random.default_rng(4)
    labels = rng.uniform(size=300) < 0.3
    continuous = rng.normal(size=(3, 300)) + labels
    tied = np.round(continuous * 2) / 2
    for scores in (continuous, tied, continuous.astype(np.float32), tied.astype(np.float32)):
        got = padim.auroc(torch.from_numpy(scores), torch.from_numpy(labels))  # sorted in their own dtype
        expected = [roc_auc_score(labels, row) for row in scores]
        assert np.allclose(got.numpy(), expected, atol=1e-12)
    assert padim.auroc(torch.ones(5), torch.tensor([0, 1, 0, 1, 1])).item() == 0.5


def test_permuted_distance_equals_a_full_recomputation():
    rng = np.random.default_rng(5)
    fit = torch.from_numpy(rng.normal(size=(30, 6, 7))).float()
    mean, cov = padim.fit_gaussian_batch(fit)
    inverse = padim.invert_covariance_(cov)
    val = torch.from_numpy(rng.normal(size=(9, 6, 7))).float()
    squared, weighted = padim.mahalanobis_terms(val, mean, inverse)
    inv_diagonal = inverse.diagonal(dim1=1, dim2=2).T
    order = torch.stack([torch.from_numpy(rng.permutation(9)) for _ in range(3)])  # (R, V)
    fast = padim.permuted_squared_distance(squared, weighted, inv_diagonal, val, 2, order)
    for r in range(3):
        shuffled = val.clone()
        shuffled[:, 2] = val[order[r], 2]
        full, _ = padim.mahalanobis_terms(shuffled, mean, inverse)
        assert torch.allclose(fast[r], full, rtol=1e-4, atol=1e-4)


def test_channel_subset_is_a_slice_of_the_full_embedding():
    torch.manual_seed(0)
    backbone = padim.resnet18_backbone()
    channels = padim.choose_channels(50, seed=3)
    assert torch.equal(channels, padim.choose_channels(50, seed=3))
    assert not torch.equal(channels, padim.choose_channels(50, seed=4))
    assert len(set(channels.tolist())) == 50 and torch.equal(channels, channels.sort().values)
    images = torch.rand(2, 3, 64, 64)
    subset = padim.FeatureExtractor(backbone, channels)(images)
    with torch.no_grad():
        layers = padim.FeatureExtractor(backbone, channels).layer_features(images)
    full = torch.cat([F.interpolate(f, size=(16, 16), mode="nearest") for f in layers], dim=1)
    # (2, 448, 16, 16): every channel, upsampled, then the subset taken afterwards
    assert full.shape[1] == padim.TOTAL_CHANNELS
    assert torch.equal(subset, full[:, channels])
    assert padim.channel_name(0) == "layer1[0]" and padim.channel_name(64) == "layer2[0]"
    assert padim.channel_name(447) == "layer3[255]"


def test_dropping_a_channel_equals_refitting_without_it():
    rng = np.random.default_rng(6)
    fit = torch.from_numpy(rng.normal(size=(40, 6, 5))).double()
    fit[:, 1] += 0.8 * fit[:, 0]  # correlated channels, so the Schur correction is not a no-op
    mean, cov = padim.fit_gaussian_batch(fit, epsilon=0.01)
    inverse = padim.invert_covariance_(cov.clone())
    val = torch.from_numpy(rng.normal(size=(7, 6, 5))).double()
    squared, weighted = padim.mahalanobis_terms(val, mean, inverse)
    dropped = padim.dropped_channel_squared(squared, weighted, inverse)  # (C, V, P)
    for c in range(6):
        keep = [i for i in range(6) if i != c]
        m, cv = padim.fit_gaussian_batch(fit[:, keep], epsilon=0.01)  # refit from scratch
        refit, _ = padim.mahalanobis_terms(val[:, keep], m, padim.invert_covariance_(cv))
        assert torch.allclose(dropped[c], refit, rtol=1e-8, atol=1e-8)
    for channels in ([0, 1], [2, 4, 5]):
        keep = [i for i in range(6) if i not in channels]
        m, cv = padim.fit_gaussian_batch(fit[:, keep], epsilon=0.01)
        refit, _ = padim.mahalanobis_terms(val[:, keep], m, padim.invert_covariance_(cv))
        got = padim.dropped_set_squared(squared, weighted, inverse, torch.tensor(channels))
        assert torch.allclose(got, refit, rtol=1e-8, atol=1e-8)
    # a single-channel set is the one-channel formula
    single = padim.dropped_set_squared(squared, weighted, inverse, torch.tensor([3]))
    assert torch.allclose(single, dropped[3], rtol=1e-10)


def test_aupro_on_hand_computed_cases():
    # one image, one row: defect region A = pixel 0, region B = pixels 2-4; normal pixels 1 and 5
    masks = np.array([[[1, 0, 1, 1, 1, 0]]], dtype=bool)
    scores = np.array([[[0.9, 0.5, 0.8, 0.1, 0.1, 0.05]]])
    # thresholds: 0.9 -> A covered, PRO (1 + 0) / 2 = 1/2, FPR 0; 0.8 -> B 1/3 covered, PRO 2/3, FPR 0;
    # 0.5 -> FPR 1/2 (PRO 2/3); 0.1 -> PRO 1, FPR 1/2; 0.05 -> FPR 1
    assert padim.aupro(scores, masks, fpr_limit=0.3) == pytest.approx(2 / 3)  # pixel-weighted would be 1/2
    assert padim.aupro(scores, masks, fpr_limit=1.0) == pytest.approx(0.5 * 2 / 3 + 0.5 * 1)
    # a defect pixel tied with a normal one: one step (0, 0) -> (1/2, 1), cut at the limit by interpolation
    masks = np.array([[[0, 1, 0]]], dtype=bool)
    scores = np.array([[[0.5, 0.5, 0.1]]])
    assert padim.aupro(scores, masks, fpr_limit=0.3) == pytest.approx(0.5 * 0.3 * 0.6 / 0.3)
    assert padim.aupro(scores, masks, fpr_limit=1.0) == pytest.approx(0.25 + 0.5)
    # regions are 8-connected per image: a diagonal pair is one region, two images give two regions
    masks = np.zeros((2, 3, 3), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True
    masks[1, 2, 2] = True
    weights = padim.region_weights(masks)
    assert weights[0, 0, 0] == pytest.approx(0.25) and weights[1, 2, 2] == pytest.approx(0.5)
    assert weights.sum() == pytest.approx(1.0)
    # a perfect map scores 1; a constant map is the chance diagonal PRO = FPR: mean of x over [0, 0.3]
    perfect = masks.astype(float)
    assert padim.aupro(perfect, masks) == pytest.approx(1.0)
    assert padim.aupro(np.zeros_like(perfect), masks) == pytest.approx(0.15)
