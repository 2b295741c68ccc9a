"""Input pipeline throughput: decode + resize + augment of a JPEG folder, eqxtl's threaded
``Loader`` against ``GrainLoader`` (the same batches made in grain worker processes),
images/s. Prints JSON lines.

    python benchmarks/grain_loader.py [--images 2000] [--workers 2] [--batch 64]

The folder (``--images`` JPEGs from scikit-image's photos, random crops of 250-400 px, 3
classes) is made once under ``--data`` (default /tmp/eqxtl-grain-bench). Each pipeline reads
one full epoch, shuffled, with ``eqxtl.Augment()`` at 224 px; the first batch is excluded
from the timing (worker start-up), and each pipeline runs ``--rounds`` times (median).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np


def make_folder(root: Path, n: int) -> Path:
    if root.is_dir() and len(list(root.rglob("*.jpg"))) == n:
        return root
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.cat()]
    rng = np.random.default_rng(0)
    for i in range(n):
        photo = photos[i % len(photos)]
        size = int(rng.integers(250, 400))
        h, w = photo.shape[:2]
        size = min(size, h, w)
        y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        folder = root / f"class{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo[y : y + size, x : x + size]).save(folder / f"{i}.jpg", quality=90)
    return root


def _count(batch) -> int:
    return int(np.sum(batch["mask"])) if "mask" in batch else len(batch["label"])


def time_epoch(batches, n_images: int) -> float:
    """Images per second over one epoch, after the first batch (worker start-up)."""
    it = iter(batches)
    first = _count(next(it))
    count, start = 0, time.perf_counter()
    for batch in it:
        count += _count(batch)
    assert first + count == n_images, (first + count, n_images)
    return count / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data", type=Path, default=Path("/tmp/eqxtl-grain-bench"))
    args = parser.parse_args(argv)

    import eqxtl

    root = make_folder(args.data, args.images)
    source = eqxtl.ImageFolder(root, verify=False)
    p = eqxtl.Preprocessing(resize=256, crop=224)
    loader = eqxtl.Loader(
        source, p, args.batch, shuffle=True, augment=eqxtl.Augment(), num_workers=args.workers
    )
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((x.split(":", 1)[1].strip() for x in lscpu.splitlines() if "Model name" in x), "")
    flags = [f for f in ("avx2", "avx512f", "fma") if f in lscpu]
    common = {"images": args.images, "batch": args.batch, "workers": args.workers,
              "cpu": model, "flags": flags}  # fmt: skip

    results = {}
    for name in ("loader_threads", "grain_processes"):
        rates = []
        for _ in range(args.rounds):
            if name == "loader_threads":
                batches = loader.epoch(0)
            else:  # the same batches, made in grain worker processes
                batches = eqxtl.GrainLoader(loader, num_workers=args.workers).epoch(0)
            rates.append(time_epoch(batches, args.images))
        results[name] = statistics.median(rates)
        rounds = [round(r, 1) for r in rates]
        record = {"pipeline": name, "images_per_sec": round(results[name], 1), "rounds": rounds}
        print(json.dumps({**record, **common}), flush=True)
    ratio = results["grain_processes"] / results["loader_threads"]
    print(json.dumps({"grain_over_loader": round(ratio, 3), **common}))


if __name__ == "__main__":
    main()
