"""The quickstart's LoRA step on its own: the packaged EfficientNet-Lite0 (ImageNet weights),
r=8 LoRA on every 1x1 convolution and a new 8-class head, BatchNorm frozen, Adam, at the
quickstart's size (batch 20, 128x128), optionally on a frozen base stored as int8.

Prints one JSON line: trace and compile seconds, the median seconds per step, and the
compiled step's temporaries (``eqxtl.memory_report``).

    python benchmarks/lite0_lora.py
    python benchmarks/lite0_lora.py --int8-base
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "examples")]

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from quickstart import LORA_GROUPS, LORA_LAYERS  # noqa: E402

import eqxtl  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--int8-base", action="store_true")
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=7)
    args = parser.parse_args()

    backbone, state = eqxtl.from_pretrained("efficientnet-lite0")
    model = eqxtl.Classifier(backbone, 8, zero_init=True)
    model = eqxtl.lora(model, LORA_LAYERS, rank=8, key=jax.random.key(0))
    spec, optimizer = eqxtl.param_groups(model, LORA_GROUPS)
    if args.int8_base:
        model = eqxtl.quantize(model, spec, "int8")
        spec, optimizer = eqxtl.param_groups(model, LORA_GROUPS)
    model = eqxtl.batchnorm_modes(model, spec)
    opt_state = optimizer.init(eqx.filter(model, spec))
    rng = np.random.default_rng(0)
    size = (args.batch_size, 3, args.size, args.size)
    batch = {
        "image": jnp.asarray(rng.normal(size=size), jnp.float32),
        "label": jnp.arange(args.batch_size) % 8,
    }
    step = eqxtl.make_step(eqxtl.task_loss(), optimizer, spec)
    start = time.perf_counter()
    lowered = step.lower(model, state, opt_state, batch, jax.random.key(1))
    traced = time.perf_counter() - start
    lowered.compile()
    compiled = time.perf_counter() - start - traced
    temp = eqxtl.memory_report(step, model, state, opt_state, batch).temp
    times = []
    for i in range(args.steps + 1):  # the first call is a warm-up
        start = time.perf_counter()
        model, state, opt_state, _ = jax.block_until_ready(
            step(model, state, opt_state, batch, jax.random.key(i))
        )
        times.append(time.perf_counter() - start)
    record = {
        "int8_base": args.int8_base,
        "batch": args.batch_size,
        "size": args.size,
        "trace_s": round(traced, 2),
        "compile_s": round(compiled, 2),
        "sec_per_step": round(statistics.median(times[1:]), 3),
        "temp_mb": round(temp / 2**20, 1),
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
