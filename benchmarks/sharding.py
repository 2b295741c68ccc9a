"""Per-device memory of the full fine-tuning step, replicated (``make_mesh(data=8)``) vs
FSDP (``make_mesh(fsdp=8)``), from XLA's memory analysis of the compiled step, plus the
step time of both on 8 virtual CPU devices (issue 21).

    python benchmarks/sharding.py                       # CLIP ViT-B/16 and ViT-L/14
    python benchmarks/sharding.py --models clip-vit-base-patch16 --no-time
    python benchmarks/sharding.py --all-devices --time-model clip-vit-base-patch16 \
        --time-batch 128 --out results/gpus.jsonl       # real accelerators (accelerator.sh)

With ``--all-devices`` the meshes span every device JAX sees (``data=n`` and ``fsdp=n``)
instead of 8 virtual CPU devices: ``accelerator.sh`` runs it so when more than one
accelerator is visible.

Memory: the very step ``make_step(..., mesh=mesh)`` compiles (its function, the shardings
``eqxtl.shard`` gives, donation of the trainable leaves and the optimizer state), lowered
from abstract arrays (nothing is allocated, so ViT-L/14 replicated 8 ways costs no 8 copies)
with AdamW and a global batch of ``--batch-size`` 224x224 images. Per device: arguments
(parameters, optimizer state, BatchNorm state, the device's part of the batch), temporaries
(activations, gathered parameters, gradients), and the estimated peak ``arguments + outputs
- aliased + temporaries``.

Step time: a smaller ViT (``--time-model``: ``small``, a ViT-S/16-sized CLIP tower, by
default, so that 8 replicated copies of its Adam state fit in the memory of a small
machine) trained for real, batch ``--time-batch``, median of ``--steps`` steps after one
warm-up step. Virtual CPU devices share the host's cores: this measures the cost of the
collectives and of the partitioned program, not a speed-up.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.tree_util as jtu  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

import eqxtl  # noqa: E402
from eqxtl._util.pytree_paths import keypath_to_str  # noqa: E402
from eqxtl.models import clip  # noqa: E402
from eqxtl.training import parallel  # noqa: E402
from eqxtl.training import step as step_module  # noqa: E402

MESHES = {"replicated": {"data": 8, "fsdp": 1}, "fsdp=8": {"data": 1, "fsdp": 8}}


def meshes(n: int) -> dict[str, dict[str, int]]:
    """The two meshes over ``n`` devices: replicated (data parallel) and fully sharded."""
    return {"replicated": {"data": n, "fsdp": 1}, f"fsdp={n}": {"data": 1, "fsdp": n}}


SMALL = dataclasses.replace(
    clip.CLIP_VIT_B16,
    hidden_size=384,
    intermediate_size=1536,
    num_attention_heads=6,
    projection_dim=None,
)


def abstract(tree, mesh):
    """``tree``'s arrays as ``ShapeDtypeStruct`` with the shardings ``eqxtl.shard`` gives."""
    flat, treedef = jtu.tree_flatten_with_path(tree)
    out = []
    for kp, x in flat:
        if isinstance(x, jax.ShapeDtypeStruct) or eqx.is_array(x):
            spec = parallel._spec(keypath_to_str(kp), x, mesh, [])
            out.append(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec)))
        else:
            out.append(x)
    return jtu.tree_unflatten(treedef, out)


def setup(name_or_config, batch: int, image: int):
    backbone, state = eqxtl.from_config(name_or_config)
    model = eqxtl.Classifier(backbone, 10, key=jax.random.key(0))
    spec = jax.tree.map(eqx.is_inexact_array, model)
    optimizer = optax.adamw(1e-4)
    batch = {
        "image": jax.ShapeDtypeStruct((batch, 3, image, image), jnp.float32),
        "label": jax.ShapeDtypeStruct((batch,), jnp.int32),
    }
    return model, state, spec, optimizer, batch


def memory(name: str, mode: str, batch_size: int) -> dict:
    model, state, spec, optimizer, batch = setup(name, batch_size, 224)
    mesh = eqxtl.make_mesh(**MESHES[mode])
    devices = mesh.devices.size
    step = eqxtl.make_step(eqxtl.task_loss(), optimizer, spec, mesh=mesh, donate=True)
    trainable, frozen = eqx.partition(model, spec)
    opt_state = jax.eval_shape(optimizer.init, eqx.filter(trainable, eqx.is_array))
    trainable, frozen, state, opt_state = abstract((trainable, frozen, state, opt_state), mesh)
    split = parallel.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=split) for k, v in batch.items()}
    shardings = step_module._Static(
        jax.tree.map(lambda x: x.sharding, (trainable, state, opt_state))
    )
    fn = step.compiled.__wrapped__
    args = ((frozen, state, batch, None, None, shardings), trainable, opt_state)
    dynamic, static = eqx.partition(args, lambda x: isinstance(x, jax.ShapeDtypeStruct))

    def closed(frozen_dyn, rest):
        out = fn(*eqx.combine((frozen_dyn, *rest), static))
        return eqx.filter(out, eqx.is_array)

    start = time.perf_counter()
    options = step_module._step_compiler_options()
    lowered = jax.jit(closed, donate_argnums=1).lower(dynamic[0], dynamic[1:])
    compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
    seconds = time.perf_counter() - start
    m = compiled.memory_analysis()
    params = sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    peak = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )
    return {
        "kind": "memory",
        "model": name,
        "mesh": mode,
        "devices": devices,
        "device": jax.devices()[0].device_kind,
        "params_m": params / 1e6,
        "batch": batch_size,
        "arguments_gb": m.argument_size_in_bytes / 1e9,
        "temp_gb": m.temp_size_in_bytes / 1e9,
        "peak_gb": peak / 1e9,
        "compile_s": seconds,
    }


def step_time(mode: str, batch_size: int, steps: int, config="small") -> dict:
    model, state, spec, optimizer, batch = setup(
        SMALL if config == "small" else config, batch_size, 224
    )
    mesh = eqxtl.make_mesh(**MESHES[mode])
    opt_state = optimizer.init(eqx.filter(model, spec))
    model, state, opt_state = eqxtl.shard((model, state, opt_state), mesh)
    step = eqxtl.make_step(eqxtl.task_loss(), optimizer, spec, mesh=mesh)
    rng = np.random.default_rng(0)
    data = {
        "image": rng.normal(size=batch["image"].shape).astype(np.float32),
        "label": rng.integers(0, 10, batch_size).astype(np.int32),
    }
    start = time.perf_counter()
    model, state, opt_state, metrics = step(model, state, opt_state, data)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model, state, opt_state, metrics = step(model, state, opt_state, data)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return {
        "kind": "step",
        "model": config,
        "mesh": mode,
        "devices": mesh.devices.size,
        "device": jax.devices()[0].device_kind,
        "batch": batch_size,
        "first_step_s": first,
        "step_s": float(np.median(times)),
    }


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        name = info.get("Model name", "?").strip()
        cpus = info.get("CPU(s)", "?").strip()
        flags = set(info.get("Flags", "").split())
        simd = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags)
        return f"{name}, {cpus} CPUs ({simd}); {platform.platform()}; jax {jax.__version__}"
    except (OSError, subprocess.CalledProcessError):
        return f"{platform.processor()}; jax {jax.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="*", default=["clip-vit-base-patch16", "clip-vit-large-patch14"]
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--time-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no-time", action="store_true")
    parser.add_argument("--time-model", default="small", help="small, or a from_config name")
    parser.add_argument("--all-devices", action="store_true", help="meshes over every device")
    parser.add_argument("--out", default=None, help="also append the rows here (JSON lines)")
    args = parser.parse_args()
    if args.all_devices:
        MESHES.clear()
        MESHES.update(meshes(jax.device_count()))
    kind = "" if args.all_devices else "virtual "
    print(f"machine: {machine()}; {jax.device_count()} {kind}devices")
    out = open(args.out, "a") if args.out else None  # noqa: SIM115
    rows = []
    for name in args.models:
        for mode in MESHES:
            row = memory(name, mode, args.batch_size)
            print(json.dumps(row), flush=True)
            if out:
                out.write(json.dumps(row) + "\n")
            rows.append(row)
    print("\n| model | params | mesh | arguments GB/device | temp GB/device | peak GB/device |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['params_m']:.0f} M | {r['mesh']} | {r['arguments_gb']:.2f} "
            f"| {r['temp_gb']:.2f} | {r['peak_gb']:.2f} |"
        )
    if args.no_time:
        return
    times = []
    for mode in MESHES:
        row = step_time(mode, args.time_batch, args.steps, args.time_model)
        print(json.dumps(row), flush=True)
        if out:
            out.write(json.dumps(row) + "\n")
        times.append(row)
    what = "ViT-S/16-sized CLIP tower (22 M)" if args.time_model == "small" else args.time_model
    print(f"\nstep time, {what}, AdamW, batch {args.time_batch}:")
    print("| mesh | first step (compile + run) s | step s |")
    print("|---|---|---|")
    for r in times:
        print(f"| {r['mesh']} | {r['first_step_s']:.1f} | {r['step_s']:.2f} |")


if __name__ == "__main__":
    main()
