"""Score a folder of images with a PaDiM model.pt saved by train.py: image scores and anomaly maps.

Every image under --images (searched recursively; PNG, JPEG or BMP, colour or grayscale, any size) gets
the model's own preprocessing (stored in model.pt), its anomaly map and its image score (the map's
maximum). Writes to the run folder (--out, default runs/padim_anomaly/score_...): scores.csv (file,
score), maps.npz (one float32 map per file, at the model's input size), a heat-map PNG per image under
maps/ (one colour scale for the whole folder, so maps compare) and summary.json.

    python padim_anomaly/score.py --model runs/padim_anomaly/RUN/model.pt --images DIR
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's common, not an installed one
from padim import anomaly_map, image_scores, mahalanobis  # noqa: E402
from padim_io import (  # noqa: E402
    IMAGE_SUFFIXES,
    Progress,
    extractor_from_model,
    image_batches,
    load_model,
    pick_device,
    verify_images,
)
from PIL import Image  # noqa: E402

from common import RunArgs, RunLogger, UserError, parse_args, run_main, run_name  # noqa: E402


@dataclass
class Args(RunArgs):
    model: str = ""  # model.pt written by train.py (required)
    images: str = ""  # folder of images to score, searched recursively (required)
    batch_size: int = 16  # images per backbone forward pass
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when available
    heatmaps: bool = True  # write one heat-map PNG per image

    RESUME_SAFE: ClassVar[frozenset[str]] = frozenset({"device", "batch_size"})  # scoring is redone whole


def check_args(args: Args) -> None:
    for flag, value in (("--model", args.model), ("--images", args.images)):
        if not value:
            raise ValueError(f"{flag} is required")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1 (got {args.batch_size})")


def find_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise UserError(f"--images {folder}: no such folder")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return paths


def key_of(path: Path, root: Path) -> str:
    """test/crack/000.png -> 'test__crack__000' (unique within the folder, safe as a file name)."""
    return "__".join(path.relative_to(root).with_suffix("").parts)


def heatmap(values: np.ndarray, vmax: float) -> Image.Image:
    rgba = plt.get_cmap("jet")(np.clip(values / vmax, 0, 1))
    return Image.fromarray((rgba[..., :3] * 255).astype(np.uint8))


@torch.no_grad()
def score_folder(args: Args, state: dict, paths: list[Path]):
    """Anomaly maps (N, S, S) and image scores (N,) of the files, streamed batch by batch."""
    config, extractor = extractor_from_model(state)
    device = pick_device(args.device)
    extractor = extractor.to(device)
    mean, inv_covariance = state["mean"].to(device), state["inv_covariance"].to(device)
    maps = []
    progress = Progress("score", len(paths))
    for batch in image_batches(paths, config, args.batch_size):
        distance = mahalanobis(extractor(batch.to(device)).flatten(2), mean, inv_covariance)  # (B, P)
        maps.append(anomaly_map(distance, config.grid, config.image_size, config.sigma).cpu())
        progress.update(len(batch))
    maps = torch.cat(maps)
    return maps.numpy(), image_scores(maps).numpy()


def write_outputs(log, args: Args, root: Path, paths: list[Path], maps, scores) -> None:
    keys = [key_of(p, root) for p in paths]
    with open(log.path("scores.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "score"])
        writer.writerows([str(p.relative_to(root)), f"{s:.6g}"] for p, s in zip(paths, scores))
    np.savez_compressed(log.path("maps.npz"), **{k: m.astype(np.float32) for k, m in zip(keys, maps)})
    if args.heatmaps:
        folder = log.path("maps")
        folder.mkdir(exist_ok=True)
        vmax = float(maps.max()) or 1.0
        for key, m in zip(keys, maps):
            heatmap(m, vmax).save(folder / f"{key}.png")


def main() -> None:
    args = parse_args(Args, check=check_args, description=__doc__)
    state = load_model(Path(args.model))
    root = Path(args.images)
    paths = find_images(root)
    verify_images(paths)  # every file decoded before a run folder exists
    category = state.get("category", "model")
    with RunLogger("padim_anomaly", run_name(f"score_{category}", args.seed), args) as log:
        maps, scores = score_folder(args, state, paths)
        write_outputs(log, args, root, paths, maps, scores)
        log.write_summary(
            {
                "model": args.model,
                "category": category,
                "n_images": len(paths),
                "score_min": float(scores.min()),
                "score_max": float(scores.max()),
                "map_max": float(maps.max()),
            }
        )
        print(f"scored {len(paths)} images with the {category} model {args.model}: scores.csv, maps.npz")


if __name__ == "__main__":
    run_main(main)
