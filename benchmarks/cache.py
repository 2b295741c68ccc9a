"""Cached features vs live head-only training: seconds per epoch.

CLIP ViT-B/32 (real configuration, random weights: speed does not depend on their values),
``--images`` random 224² images, batch 32, the head trained with Adam.

- live epoch: ``fit(2 epochs) - fit(1 epoch)`` without caching, after a warm-up ``fit``;
- first cached epoch: ``extract_features`` over the data (what ``fit`` runs once);
- cached epoch: the loop ``fit`` runs on cached features (``FeatureLoader`` batches through
  the compiled head-only step), timed over ``--cached-epochs`` epochs after a warm-up epoch.

Prints JSON lines and the ratio (issue 6 bar: epochs after the first >= 100x faster).

    python benchmarks/cache.py [--images 256] [--cached-epochs 50]
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
    parser.add_argument("--cached-epochs", type=int, default=50)
    parser.add_argument("--model", default="clip-vit-base-patch32")
    args = parser.parse_args()

    import equinox as eqx
    import jax
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
            eqxtl.Loader(data, eqxtl.preprocessing_for(model), C.BATCH, shuffle=True),
            epochs=epochs,
            runtime=eqxtl.Runtime(cache_features=cache, progress=False),
        )
        return time.perf_counter() - start

    run(1, False)  # warm-up: both timed runs then find the step compiled
    live_epoch = run(2, False) - run(1, False)

    model = eqxtl.Classifier(backbone, 3, zero_init=True)
    spec = eqxtl.trainable(model, "head")
    loader = eqxtl.Loader(data, eqxtl.preprocessing_for(model), C.BATCH, shuffle=True)
    (features, first_epoch) = C.timed(
        lambda: eqxtl.extract_features(model, state, loader, progress=False)
    )
    cached = eqxtl.FeatureLoader(features, loader)
    optimizer = optax.adam(1e-3)
    step = eqxtl.make_step(eqxtl.task_loss(eqxtl.Classification(), features=True), optimizer, spec)
    opt_state = optimizer.init(eqx.filter(model, spec))
    key = jax.random.key(0)

    def epochs(first: int, count: int):
        nonlocal model, state, opt_state
        for e in range(first, first + count):
            for batch in cached.epoch(e):
                model, state, opt_state, metrics = step(model, state, opt_state, batch, key)
        return jax.block_until_ready(metrics)

    epochs(0, 1)  # compiles
    _, seconds = C.timed(lambda: epochs(1, args.cached_epochs))
    cached_epoch = seconds / args.cached_epochs
    common = {"model": args.model, "images": args.images, "batch": C.BATCH}
    C.emit({"kind": "cache", "mode": "live", "sec_per_epoch": round(live_epoch, 4), **common})
    C.emit(
        {
            "kind": "cache",
            "mode": "cached",
            "sec_per_epoch": round(cached_epoch, 5),
            "first_epoch_s": round(first_epoch, 2),
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
