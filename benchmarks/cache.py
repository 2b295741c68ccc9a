"""Cached features vs live head-only training: seconds per epoch.

CLIP ViT-B/32 (real configuration, random weights: speed does not depend on their values),
``--images`` random 224² images, batch 32, the head trained with Adam. An epoch's cost is
measured as a difference of whole ``eqxtl.fit`` runs, so compilation and feature extraction
cancel out: live epoch = fit(2 epochs) - fit(1 epoch) without caching; cached epoch =
(fit(1 + N epochs) - fit(1 epoch)) / N with in-memory feature caching. Prints JSON lines and
the ratio (issue 6 bar: epochs after the first >= 100x faster).

    python benchmarks/cache.py [--images 256] [--cached-epochs 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--cached-epochs", type=int, default=20)
    parser.add_argument("--model", default="clip-vit-base-patch32")
    args = parser.parse_args()

    import numpy as np
    import optax

    import eqxtl

    backbone, state = eqxtl.from_config(args.model)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, 224, 224, 3), dtype=np.uint8)
    data = eqxtl.ArraySource(images, rng.integers(0, 3, args.images), ["a", "b", "c"])

    def run(epochs: int, cache: bool) -> float:
        model = eqxtl.Classifier(backbone, 3, zero_init=True)
        spec = eqxtl.trainable(model, "head")
        start = time.perf_counter()
        eqxtl.fit(
            model,
            state,
            optax.adam(1e-3),
            spec,
            data,
            epochs=epochs,
            batch_size=C.BATCH,
            cache_features=cache,
            progress=False,
        )
        return time.perf_counter() - start

    live_1, live_2 = run(1, False), run(2, False)
    cached_1, cached_n = run(1, True), run(1 + args.cached_epochs, True)
    live_epoch = live_2 - live_1
    cached_epoch = (cached_n - cached_1) / args.cached_epochs
    common = {"model": args.model, "images": args.images, "batch": C.BATCH}
    C.emit({"kind": "cache", "mode": "live", "sec_per_epoch": round(live_epoch, 4), **common})
    C.emit(
        {
            "kind": "cache",
            "mode": "cached",
            "sec_per_epoch": round(cached_epoch, 5),
            "first_run_s": round(cached_1, 2),
            **common,
        }
    )
    C.emit(
        {
            "kind": "cache_summary",
            "live_over_cached": round(live_epoch / max(cached_epoch, 1e-9), 1),
            "peak_rss_mb": round(C.peak_rss_mb(), 1),
            **common,
        }
    )


if __name__ == "__main__":
    main()
