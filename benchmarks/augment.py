"""RandAugment / TrivialAugment / random erasing throughput (issue 23): where to run them.

    python benchmarks/augment.py [--images 2000] [--workers N] [--batch 64] [--rounds 2]

Three measurements, JSON lines:

1. ``pipeline``: images/s of one shuffled epoch of a ``--images`` JPEG folder (scikit-image
   photos, random crops of 250-400 px, made once under ``--data``; the folder of
   benchmarks/grain_loader.py) through ``eqxtl.Loader`` threads at 224 px: decode, random
   resized crop, flip, the policy in PIL, normalisation, erasing; for ``Augment()`` alone and
   with each policy. The first batch is excluded (start-up); median of ``--rounds``.
2. ``op``: milliseconds per 224x224 image of each op alone (PIL, one thread), RandAugment at
   magnitude 9 and TrivialAugment at bin 20.
3. ``device``: the alternative, on the accelerator inside the step: a jitted, vmapped jnp
   version of TrivialAugment's colour ops (Identity, Brightness, Color, Contrast, Solarize,
   Posterize, one drawn per image as TrivialAugment draws) plus pixel random erasing, on a
   ``(B, 3, 224, 224)`` float32 batch; images/s on whatever ``jax.devices()[0]`` is. The
   geometric ops (shear, translate, rotate) are left out: they need a gather per pixel.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grain_loader import make_folder, time_epoch  # noqa: E402


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((x.split(":", 1)[1].strip() for x in lscpu.splitlines() if "Model name" in x), "")
    flags = [f for f in ("avx2", "avx512f", "fma") if f in lscpu]
    load = os.getloadavg()[0]
    return {"cpu": model, "cores": os.cpu_count(), "flags": flags, "load1": round(load, 1)}


def pipelines(args, common):
    import eqxtl

    root = make_folder(args.data, args.images)
    source = eqxtl.ImageFolder(root, verify=False)
    p = eqxtl.Preprocessing(
        resize=256, crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
    )
    ra, ta, re = eqxtl.RandAugment(), eqxtl.TrivialAugment(), eqxtl.RandomErasing()
    variants = {
        "crop_flip": eqxtl.Augment(),
        "rand_augment": eqxtl.Augment(policy=ra),
        "trivial_augment": eqxtl.Augment(policy=ta),
        "rand_augment+erasing": eqxtl.Augment(policy=ra, erasing=re),
        "trivial_augment+erasing": eqxtl.Augment(policy=ta, erasing=re),
    }
    for name, augment in variants.items():
        loader = eqxtl.Loader(
            source, p, args.batch, shuffle=True, augment=augment, num_workers=args.workers
        )
        rates = [time_epoch(loader.epoch(r), args.images) for r in range(args.rounds)]
        record = {"pipeline": name, "images_per_sec": round(statistics.median(rates), 1),
                  "rounds": [round(r, 1) for r in rates]}  # fmt: skip
        print(json.dumps({**record, **common}), flush=True)


def _ms(fn, image, repeat):
    fn(image)
    start = time.perf_counter()
    for _ in range(repeat):
        fn(image)
    return (time.perf_counter() - start) / repeat * 1e3


def ops(args, common):
    from PIL import Image
    from skimage import data

    import eqxtl

    image = np.asarray(Image.fromarray(data.astronaut()).resize((224, 224)))
    p = eqxtl.Preprocessing(
        resize=256, crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
    )
    ra, ta = eqxtl.RandAugment(), eqxtl.TrivialAugment()
    out = {}
    for name in ra.op_names:
        out[f"rand_augment/{name}"] = _ms(lambda x, n=name: ra.op(x, n, 9, p), image, args.repeat)
    for name in ta.op_names:
        out[f"trivial_augment/{name}"] = _ms(lambda x, n=name: ta.op(x, n, 20), image, args.repeat)
    rng = np.random.default_rng(0)
    out["rand_augment/__call__"] = _ms(lambda x: ra(x, p, rng), image, args.repeat)
    out["trivial_augment/__call__"] = _ms(lambda x: ta(x, p, rng), image, args.repeat)
    x = eqxtl.Augment()(image, p, rng)
    er = eqxtl.RandomErasing(prob=1.0)
    out["random_erasing/pixel"] = _ms(lambda y: er(y, rng), x, args.repeat)
    for k, v in out.items():
        print(json.dumps({"op": k, "ms_per_image": round(v, 3), **common}), flush=True)


def device(args, common):
    import jax
    import jax.numpy as jnp

    mean = jnp.asarray([0.485, 0.456, 0.406])[:, None, None]
    std = jnp.asarray([0.229, 0.224, 0.225])[:, None, None]
    gray_w = jnp.asarray([0.299, 0.587, 0.114])[:, None, None]
    bins = jnp.linspace(0.0, 0.99, 31)

    def colour_op(x, key):  # x: float (3, H, W) in 0..255, as the PIL ops see it
        k_op, k_bin, k_sign = jax.random.split(key, 3)
        op = jax.random.randint(k_op, (), 0, 6)
        b = jax.random.randint(k_bin, (), 0, 31)
        v = bins[b] * jnp.where(jax.random.bernoulli(k_sign), -1.0, 1.0)
        gray = (x * gray_w).sum(0, keepdims=True)
        blend = lambda other, f: jnp.clip(other + f * (x - other), 0, 255)  # noqa: E731
        branches = [
            lambda: x,
            lambda: blend(jnp.zeros_like(x), 1 + v),
            lambda: blend(jnp.broadcast_to(gray, x.shape), 1 + v),
            lambda: blend(jnp.full_like(x, gray.mean()), 1 + v),
            lambda: jnp.where(x >= 255 - 255 * bins[b], 255 - x, x),
            lambda: jnp.floor(x / 2 ** (6 * bins[b] // 1)) * 2 ** (6 * bins[b] // 1),
        ]
        return jax.lax.switch(op, branches)

    def erase(x, key):  # pixel mode, one box, area U(0.02, 1/3), log aspect U(log .3, log 1/.3)
        k1, k2, k3, k4, k5 = jax.random.split(key, 5)
        _, h, w = x.shape
        area = jax.random.uniform(k1, (), minval=0.02, maxval=1 / 3) * h * w
        aspect = jnp.exp(jax.random.uniform(k2, (), minval=np.log(0.3), maxval=-np.log(0.3)))
        bh = jnp.minimum(jnp.round(jnp.sqrt(area * aspect)), h - 1)
        bw = jnp.minimum(jnp.round(jnp.sqrt(area / aspect)), w - 1)
        top = jax.random.uniform(k3, ()) * (h - bh)
        left = jax.random.uniform(k4, ()) * (w - bw)
        ys, xs = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
        inside = (ys >= top) & (ys < top + bh) & (xs >= left) & (xs < left + bw)
        return jnp.where(inside, jax.random.normal(k5, x.shape), x)

    @jax.jit
    def augment(batch, key):  # uint8-valued float (B, 3, H, W) -> normalised, erased
        keys = jax.random.split(key, (batch.shape[0], 2))
        x = jax.vmap(colour_op)(batch, keys[:, 0])
        x = (x / 255 - mean) / std
        return jax.vmap(erase)(x, keys[:, 1])

    batch = jnp.asarray(
        np.random.default_rng(0).integers(0, 256, (args.batch, 3, 224, 224)), jnp.float32
    )
    key = jax.random.key(0)
    augment(batch, key).block_until_ready()
    times = []
    for r in range(args.rounds * 5):
        start = time.perf_counter()
        augment(batch, jax.random.fold_in(key, r)).block_until_ready()
        times.append(time.perf_counter() - start)
    rate = args.batch / statistics.median(times)
    record = {"device": str(jax.devices()[0].platform), "what": "colour ops + pixel erasing, jnp",
              "images_per_sec": round(rate, 1), "batch": args.batch}  # fmt: skip
    print(json.dumps({**record, **common}), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=20, help="calls per op timing")
    parser.add_argument("--only", choices=("pipeline", "op", "device"), nargs="*")
    parser.add_argument("--data", type=Path, default=Path("/tmp/eqxtl-grain-bench"))
    args = parser.parse_args(argv)
    common = {**machine(), "workers": args.workers}
    for part, fn in (("pipeline", pipelines), ("op", ops), ("device", device)):
        if not args.only or part in args.only:
            fn(args, common)


if __name__ == "__main__":
    main()
