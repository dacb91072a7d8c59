"""Everything PaDiM's scripts read or write: MVTec AD on disk, backbone weights, models, memory meters."""

from __future__ import annotations

import ctypes
import os
import pickle
import resource
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from padim import (
    TOTAL_CHANNELS,
    FeatureExtractor,
    ModelConfig,
    OnlineGaussian,
    anomaly_map,
    fit_gaussian_batch,
    image_scores,
    invert_covariance_,
    mahalanobis,
    resnet18_backbone,
)
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from common import UserError, clock, load_torch, save_torch

MVTEC_PAGE = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
_ARCHIVES = "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/"
MVTEC_URLS = {  # MVTec's official per-category archives (.tar.xz); MVTec publishes no checksums
    "bottle": _ARCHIVES + "420937370-1629951468/bottle.tar.xz",
    "transistor": _ARCHIVES + "420938166-1629953277/transistor.tar.xz",
    "metal_nut": _ARCHIVES + "420937637-1629952063/metal_nut.tar.xz",
}


def model_config(args) -> ModelConfig:
    """The model's preprocessing from a script's --n-features, --image-size and --crop."""
    crop = getattr(args, "crop", False)
    return ModelConfig(
        n_features=n_features_of(args.n_features),
        image_size=args.image_size,
        resize=round(args.image_size * 8 / 7) if crop else args.image_size,
        crop=crop,
    )


class Progress:
    """A tqdm bar on a terminal; otherwise a line every ~10% with rate and ETA (a log is never silent)."""

    def __init__(self, desc: str, total: int | None, unit: str = "img"):
        self.desc, self.total, self.unit, self.done = desc, total, unit, 0
        self.start = time.perf_counter()
        self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False) if sys.stderr.isatty() else None
        self.next_mark = 1

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if self.total and self.bar.n >= self.total:
                self.bar.close()
            return
        self.done += n
        if not self.total or self.done * 10 < self.next_mark * self.total:
            return
        self.next_mark = self.done * 10 // self.total + 1
        text = progress_text(self.done, self.total, time.perf_counter() - self.start, self.unit)
        print(f"{self.desc}: {text}", flush=True)


def progress_text(done: int, total: int, seconds: float, unit: str) -> str:
    """'40/100 (40%), 0:12 elapsed, 3.3 img/s, ETA 0:18': the rate of the `done` items so far sets the ETA."""
    rate = done / seconds if seconds > 0 else 0.0
    eta = clock((total - done) / rate) if rate > 0 else "unknown"
    share = f"{done}/{total} ({100 * done // total}%)"
    return f"{share}, {clock(seconds)} elapsed, {rate:.1f} {unit}/s, ETA {eta}"


def n_features_of(text: str, low: int = 1) -> int:
    """`--n-features` as a channel count: an integer in low..448 or 'all'; a ValueError names the flag."""
    try:
        n = TOTAL_CHANNELS if text == "all" else int(text)
    except ValueError:
        raise ValueError(
            f"--n-features must be an integer in {low}..{TOTAL_CHANNELS} or 'all' (got {text!r})"
        ) from None
    if not low <= n <= TOTAL_CHANNELS:
        raise ValueError(
            f"--n-features must be in {low}..{TOTAL_CHANNELS} (ResNet18 layer1-3 have "
            f"{TOTAL_CHANNELS} channels) or 'all' (got {n})"
        )
    return n


def check_image_size(size: int) -> None:
    if size < 64 or size % 16:
        raise ValueError(f"--image-size must be a multiple of 16, at least 64 (got {size})")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
LICENSE_NOTE = (
    "MVTec AD is licensed CC BY-NC-SA 4.0 (non-commercial use only); "
    "downloading it means you accept the license"
)


# ---------------------------------------------------------------- the dataset on disk


@dataclass
class Category:
    name: str
    root: Path
    train: list[Path]  # train/good
    test: list[Path]
    test_types: list[str]  # "good" or the defect type, one per test image
    masks: list[Path | None] = field(default_factory=list)  # None for good test images

    @property
    def test_labels(self) -> np.ndarray:
        return np.array([t != "good" for t in self.test_types], dtype=np.int64)

    def train_batches(self, config: ModelConfig, batch_size: int):
        return image_batches(self.train, config, batch_size)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def download_category(name: str, data_dir: Path, timeout: float = 60.0) -> None:
    """Fetch and unpack MVTec's archive for one category into data_dir/mvtec_ad/."""
    target = data_dir / "mvtec_ad"
    archive = target / f"{name}.tar.xz"
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {target} for the MVTec AD download: {e.strerror}") from None
    print(f"downloading MVTec AD '{name}' from {MVTEC_URLS[name]} ({LICENSE_NOTE})")
    try:
        with (
            urllib.request.urlopen(MVTEC_URLS[name], timeout=timeout) as response,
            open(f"{archive}.part", "wb") as out,
        ):
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"{name}.tar.xz", disable=None) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
        os.replace(f"{archive}.part", archive)
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
        archive.unlink()
    except (urllib.error.URLError, TimeoutError, OSError, tarfile.TarError) as e:
        Path(f"{archive}.part").unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
        raise UserError(
            f"MVTec AD '{name}' is not in {target / name} and the download from {MVTEC_URLS[name]} failed "
            f"({reason}); download {name}.tar.xz from {MVTEC_PAGE} (accepting its CC BY-NC-SA 4.0 license) "
            f"and unpack it into {target}, or point --data-dir at a folder holding mvtec_ad/{name}"
        ) from None


def category_names(names: list[str], data_dir: str | Path) -> list[str]:
    """--category values -> folder names; `all` = every folder under mvtec_ad/ that has train/good."""
    if "all" not in names:
        return list(dict.fromkeys(names))
    root = Path(data_dir) / "mvtec_ad"
    found = sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir()) if root.is_dir() else []
    if not found:
        raise UserError(f"--category all: no class folders with train/good under {root}")
    return found


def find_category(name: str, data_dir: str | Path, download: bool = True) -> Category:
    """List one category's files and check the layout; downloads bottle/transistor/metal_nut when absent."""
    data_dir = Path(data_dir)
    root = data_dir / "mvtec_ad" / name
    if not root.exists():
        if name not in MVTEC_URLS:
            raise UserError(
                f"no folder {root}; --category takes any folder under {root.parent} with the MVTec AD layout "
                "(train/good, test/<type>, ground_truth/<type>/*_mask.png)"
            )
        if not download:
            raise UserError(
                f"MVTec AD '{name}' is not in {root}; download {name}.tar.xz from {MVTEC_PAGE} "
                f"and unpack it into {root.parent}, or run without --no-download"
            )
        download_category(name, data_dir)
    where = f"(expected the MVTec AD layout {root}/{{train/good, test/<type>, ground_truth/<type>}})"
    for sub in ("train/good", "test", "ground_truth"):
        if not (root / sub).is_dir():
            raise UserError(f"missing folder {root / sub} {where}")
    train = _images_in(root / "train" / "good")
    if not train:
        raise UserError(f"no training images in {root / 'train' / 'good'} {where}")
    test, types, masks = [], [], []
    for folder in sorted(p for p in (root / "test").iterdir() if p.is_dir()):
        for image in _images_in(folder):
            test.append(image)
            types.append(folder.name)
            if folder.name == "good":
                masks.append(None)
                continue
            mask = root / "ground_truth" / folder.name / f"{image.stem}_mask.png"
            if not mask.is_file():
                raise UserError(f"no ground-truth mask {mask} for the test image {image} {where}")
            masks.append(mask)
    if not test:
        raise UserError(f"no test images under {root / 'test'} {where}")
    if all(t == "good" for t in types) or "good" not in types:
        raise UserError(f"the test split {root / 'test'} needs both good and defective images for AUROC")
    return Category(name, root, train, test, types, masks)


# ---------------------------------------------------------------- images


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # how PIL opens 16-bit grayscale PNGs


def _decode(image: Image.Image, path: Path, mode: str) -> Image.Image:
    """A decoded PIL image -> `mode`, refusing what has no faithful 8-bit reading.

    PIL's own convert clips 16-bit grayscale to 255 (a 16-bit PNG would turn almost white), so 16-bit
    values are scaled to 8 bits (value / 257, rounded: an 8-bit image stored as 16 bits reads back
    exactly). Palette and CMYK images go through PIL's conversion; an alpha channel (or a transparent
    palette entry) is dropped when every pixel is opaque and refused otherwise.
    """
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        if values.min() < 0 or values.max() > 65535:
            raise UserError(
                f"the image {path} has {image.mode} values outside 0..65535; save it as 8- or 16-bit"
            )
        image = Image.fromarray(np.rint(values / 257).astype(np.uint8), mode="L")
    elif image.mode == "F":
        raise UserError(f"the image {path} holds 32-bit floats (PIL mode F); save it as 8- or 16-bit")
    if "transparency" in image.info and image.mode in ("P", "L", "RGB"):
        image = image.convert("RGBA" if image.mode != "L" else "LA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        low, _ = image.getchannel("A").getextrema()
        if low < 255:
            raise UserError(
                f"the image {path} has transparent pixels (alpha {low} < 255); PaDiM reads opaque images: "
                "flatten it onto a background first"
            )
    return image.convert(mode)


def _open(path: Path, mode: str) -> Image.Image:
    """Decode a whole file into `mode` ("RGB" for images, "L" for masks); one line naming it if it can't."""
    try:
        with Image.open(path) as image:
            image.load()
            return _decode(image, path, mode)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(
            f"cannot decode the image {path} ({e.__class__.__name__}: {e}); replace or remove the file"
        ) from None


def _geometry(image: Image.Image, config: ModelConfig, interpolation) -> Image.Image:
    """Resize the whole image to image_size x image_size (default, as anomalib), or with --crop resize
    the shorter side to `resize` and centre crop image_size (the paper's preprocessing)."""
    if not config.crop:
        return TF.resize(
            image, [config.image_size, config.image_size], interpolation=interpolation, antialias=True
        )
    image = TF.resize(image, config.resize, interpolation=interpolation, antialias=True)
    return TF.center_crop(image, config.image_size)


def load_image(path: Path, config: ModelConfig) -> torch.Tensor:
    """Any size, colour or grayscale -> (3, image_size, image_size) in [0, 1]."""
    return TF.to_tensor(_geometry(_open(path, "RGB"), config, TF.InterpolationMode.BILINEAR))


def load_mask(path: Path | None, image_path: Path, config: ModelConfig) -> torch.Tensor:
    """-> (image_size, image_size) bool; all False for a good image. Same resize and crop as the image."""
    if path is None:
        return torch.zeros(config.image_size, config.image_size, dtype=torch.bool)
    mask = _open(path, "L")
    with Image.open(image_path) as image:
        if image.size != mask.size:
            raise UserError(
                f"the mask {path} is {mask.size[0]}x{mask.size[1]} but its image {image_path} is "
                f"{image.size[0]}x{image.size[1]}; masks must match their images"
            )
    if not np.asarray(mask).any():
        return torch.zeros(config.image_size, config.image_size, dtype=torch.bool)
    out = TF.to_tensor(_geometry(mask, config, TF.InterpolationMode.NEAREST))[0] > 0.5
    if not out.any():
        cause = "resize"  # nearest-neighbour downscaling skipped every defect pixel
        if config.crop:
            resized = TF.resize(mask, config.resize, interpolation=TF.InterpolationMode.NEAREST)
            cause = "crop" if (np.asarray(resized) > 127).any() else "resize"
        pixels = int((np.asarray(mask) > 127).sum())
        warnings_emptied.append((path, cause, pixels, mask.size))
    return out


# (mask, "crop" or "resize", defect pixels, (width, height)) of each defect lost to the preprocessing
warnings_emptied: list[tuple] = []


def load_images(paths: list[Path], config: ModelConfig, desc: str) -> torch.Tensor:
    """(N, 3, S, S) in memory; decodes every file first, so a bad one stops the run before it starts."""
    progress = Progress(desc, len(paths))
    images = []
    for p in paths:
        images.append(load_image(p, config))
        progress.update(1)
    return torch.stack(images)


def load_test_set(category: Category, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    images = load_images(category.test, config, f"{category.name} test images")
    warnings_emptied.clear()
    masks = torch.stack([load_mask(m, p, config) for p, m in zip(category.test, category.masks)])
    n_defective = int(category.test_labels.sum())
    consequence = (
        "they still count as defective in image AUROC but add no defect pixel to pixel AUROC or AUPRO"
    )
    for cause in ("crop", "resize"):
        lost = [entry for entry in warnings_emptied if entry[1] == cause]
        if not lost:
            continue
        path, _, pixels, (width, height) = lost[0]
        if cause == "crop":
            what = (
                f"the centre crop (--crop: shorter side resized to {config.resize}, centre "
                f"{config.image_size}x{config.image_size} kept) cuts the whole defect out of"
            )
            hint = "without --crop the whole image is kept"
        else:
            what = (
                f"resizing to {config.image_size}x{config.image_size} (nearest neighbour) leaves no defect "
                "pixel in the mask of"
            )
            hint = "their defects are thinner than the resize step; a larger --image-size keeps them"
        print(
            f"warning: {what} {len(lost)} of {n_defective} defective test images of {category.name} (e.g. "
            f"{path}: {pixels} defect pixel{'s' if pixels != 1 else ''} in {width}x{height}); "
            f"{consequence}; {hint}",
            file=sys.stderr,
        )
    return images, masks


def verify_images(paths: list[Path]) -> None:
    """Decode every file fully (a truncated JPEG fails here, not mid-fit), before a run folder exists."""
    for path in paths:
        _open(path, "RGB")


def load_category(name, data_dir, download: bool, config: ModelConfig, verify_only: bool = False):
    """Find a class, decode all its train images and its test set -> (Category, (images, masks))."""
    category = find_category(name, data_dir, download)
    verify_images(category.train)
    test_set = load_test_set(category, config)
    return None if verify_only else (category, test_set)


def image_batches(paths: list[Path], config: ModelConfig, batch_size: int):
    """Streams (B, 3, S, S) batches from disk: only one batch of images is ever held."""
    for start in range(0, len(paths), batch_size):
        yield torch.stack([load_image(p, config) for p in paths[start : start + batch_size]])


# ---------------------------------------------------------------- backbone weights and devices


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu or auto")
    return torch.device(name)


def backbone_weights(weights: str, seed: int) -> tuple[torch.nn.Module, str]:
    """`imagenet` (torchvision's weights API and cache), `none` (random init from `seed`) or a PATH.

    Returns the ResNet18 and a short description of where its weights came from.
    """
    if weights == "none":
        torch.manual_seed(seed)
        return resnet18_backbone(), f"random init (seed {seed})"
    if weights == "imagenet":
        from torchvision.models import ResNet18_Weights

        api = ResNet18_Weights.IMAGENET1K_V1
        try:
            state = api.get_state_dict(progress=True, check_hash=True)
        except (urllib.error.URLError, TimeoutError, OSError, RuntimeError) as e:
            raise UserError(
                f"could not load torchvision's ImageNet ResNet18 weights ({api.url}): not in the torch hub "
                f"cache ({torch.hub.get_dir()}/checkpoints) and the download failed "
                f"({getattr(e, 'reason', e)}); "
                "use --weights none (random init) or --weights PATH (a local ResNet18 state dict)"
            ) from None
        return resnet18_backbone(state), "torchvision ResNet18_Weights.IMAGENET1K_V1"
    path = Path(weights)
    if not path.exists():
        raise UserError(
            f"--weights {weights}: no such file (use imagenet, none, or the path of a ResNet18 "
            "state dict saved with torch.save(model.state_dict(), PATH))"
        )
    try:
        state = load_torch(path, what="--weights")  # a folder, a damaged file or NaN weights: one line
    except UserError as e:
        if "not a torch checkpoint" not in str(e):
            raise
        raise UserError(f"--weights {path} is not a torchvision ResNet18 state dict (not torch)") from None
    try:
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        return resnet18_backbone(state), f"state dict {path}"
    except (
        RuntimeError,
        OSError,
        ValueError,
        TypeError,
        KeyError,
        AttributeError,
        EOFError,
        pickle.UnpicklingError,
    ) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise UserError(f"--weights {path} is not a torchvision ResNet18 state dict ({first_line})") from None


# ---------------------------------------------------------------- fitting and scoring loops


def fit_statistics(
    extractor, batches, n_images: int, method: str, epsilon: float, device, desc: str = "fit"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stream image batches through the backbone -> mean (C, P) and inverse covariance (P, C, C).

    method "online": running statistics, one batch of embeddings at a time.
    method "batch": the traditional way, every embedding kept, then mean and covariance at once.
    """
    n_channels, n_positions = len(extractor.channels), None
    stats, stored = None, []
    progress = Progress(f"{desc} ({method})", n_images)
    for images in batches:
        embedding = extractor(images.to(device)).flatten(2)  # (B, C, P)
        if method == "online":
            if stats is None:
                n_positions = embedding.shape[2]
                stats = OnlineGaussian(n_channels, n_positions, device=embedding.device)
            stats.update(embedding)
        else:
            stored.append(embedding)
        progress.update(len(images))
    if method == "online":
        mean, covariance = stats.finalize(epsilon)
    else:
        embeddings = torch.cat(stored)  # (N, C, P)
        stored.clear()
        mean, covariance = fit_gaussian_batch(embeddings, epsilon)
        del embeddings
    return mean, invert_covariance_(covariance)


@torch.no_grad()
def score_images(
    extractor,
    images: torch.Tensor,
    mean,
    inv_covariance,
    config: ModelConfig,
    device,
    batch_size: int,
    desc: str = "score",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, S, S) -> anomaly maps (N, S, S) and image scores (N,), on the CPU."""
    maps = []
    progress = Progress(desc, len(images))
    for start in range(0, len(images), batch_size):
        embedding = extractor(images[start : start + batch_size].to(device)).flatten(2)  # (B, C, P)
        distance = mahalanobis(embedding, mean, inv_covariance)  # (B, P)
        maps.append(anomaly_map(distance, config.grid, config.image_size, config.sigma).cpu())
        progress.update(len(embedding))
    maps = torch.cat(maps)
    return maps, image_scores(maps)


# ---------------------------------------------------------------- models on disk


def save_model(path: Path, config: ModelConfig, extractor, mean, inv_covariance, extra: dict) -> None:
    """Atomic: temporary file, then rename. Holds everything needed to score without the training data."""
    state = {
        "config": asdict(config),
        "channels": extractor.channels.cpu(),
        "backbone": {k: v.cpu() for k, v in extractor.state_dict().items()},
        "mean": mean.cpu(),
        "inv_covariance": inv_covariance.cpu(),
        **extra,
    }
    save_torch(state, path)


MODEL_KEYS = ("config", "channels", "backbone", "mean", "inv_covariance")


def load_model(path: Path) -> dict:
    """A model.pt written by save_model; anything else -> one line naming the file."""
    state = load_torch(path)
    missing = [k for k in MODEL_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise UserError(f"{path} is not a PaDiM model.pt from train.py (missing {', '.join(missing)})")
    return state


def extractor_from_model(state: dict) -> tuple[ModelConfig, FeatureExtractor]:
    """Rebuild the preprocessing and the feature extractor saved in a model.pt."""
    config = ModelConfig(**state["config"])
    extractor = FeatureExtractor(resnet18_backbone(), state["channels"])
    extractor.load_state_dict(state["backbone"])
    return config, extractor.eval()


# ---------------------------------------------------------------- memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _glibc_mallinfo2():
    """glibc's mallinfo2 (2.33+), or None elsewhere (macOS, musl, older glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        function = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    function.restype = _MallInfo2
    return function


_MALLINFO2 = _glibc_mallinfo2() if sys.platform.startswith("linux") else None


def _live_heap_bytes() -> int:
    """Bytes the C allocator has handed out and not yet had back: in-use heap chunks + mmapped blocks.

    Every CPU tensor, numpy array and Python object is malloc'd, so this counts live data only; memory
    glibc keeps after a free (what the RSS still shows) is not in it.
    """
    info = _MALLINFO2()
    return info.uordblks + info.hblkhd


def live_mib(device: torch.device) -> float:
    """Memory in use now: CUDA allocated bytes, else live heap bytes (glibc), else the process RSS."""
    if torch.device(device).type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    if _MALLINFO2 is not None:
        return _live_heap_bytes() / 2**20
    return _rss_bytes() / 2**20 if os.path.exists("/proc/self/statm") else 0.0


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


class PeakMemory:
    """Peak memory of a block above its start, two ways.

    peak_mib: resident set size (what the OS charges): CUDA max_memory_allocated on a GPU; on Linux the
    RSS sampled every `interval` s in a thread (torch's CPU ops release the GIL, so it runs during them);
    elsewhere ru_maxrss. live_peak_mib: live allocations only: torch.cuda.max_memory_allocated on a GPU,
    glibc mallinfo2 (in-use heap + mmapped blocks) sampled with the RSS on Linux, else None.
    """

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device, self.interval = torch.device(device), interval
        self.peak_bytes, self.live_peak_bytes = 0, None
        self.cuda = self.device.type == "cuda"
        self.sampled = not self.cuda and os.path.exists("/proc/self/statm")
        self.heap = self.sampled and _MALLINFO2 is not None
        if self.cuda:
            self.method = "torch.cuda.max_memory_allocated (peak above the block's start)"
        elif self.sampled:
            self.method = f"process RSS sampled every {interval * 1000:g} ms (peak above the block's start)"
            if self.heap:
                self.method += "; live: glibc mallinfo2 in-use heap + mmapped bytes, sampled with it"
        else:
            self.method = "ru_maxrss high-water mark minus the RSS at the block's start"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        elif self.sampled:
            self._start = self._peak = _rss_bytes()
            self._heap_start = self._heap_peak = _live_heap_bytes() if self.heap else 0
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        else:
            self._start = _max_rss_bytes()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            if self.heap:
                self._heap_peak = max(self._heap_peak, _live_heap_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.live_peak_bytes = max(0, peak - self._start)
        elif self.sampled:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, _rss_bytes())
            if self.heap:
                heap_peak = max(self._heap_peak, _live_heap_bytes())
                self.live_peak_bytes = max(0, heap_peak - self._heap_start)
        else:
            peak = _max_rss_bytes()
        self.peak_bytes = max(0, peak - self._start)

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20

    @property
    def live_peak_mib(self) -> float | None:
        return None if self.live_peak_bytes is None else self.live_peak_bytes / 2**20
