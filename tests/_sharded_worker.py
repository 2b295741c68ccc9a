"""One process of the sharded checkpoint tests (tests/test_sharded_checkpoints.py).

    python -m tests._sharded_worker multi PROCESS_ID PORT WORK_DIR   # 2 processes x 4 devices
    python -m tests._sharded_worker single WORK_DIR                  # 1 process x 8 devices

``multi``: fit 2 steps at ``fsdp=8`` over both processes into WORK_DIR/multi (each process
writes its shards), copy that run to WORK_DIR/multi-at-2, resume it to 3 steps.
``single``: 3 steps on 1 device and at ``fsdp=8``; 2 steps then a resume to 3 on the same
mesh, on 4 devices, from the run the 2 processes wrote, and onto a mesh that cannot hold
the state. Prints one JSON line.
"""

import os
import sys

mode = sys.argv[1]
# XLA:CPU's LLVM optimisations cost more than these few tiny steps gain (every run here
# uses the same flags, so the comparisons hold)
os.environ["XLA_FLAGS"] = (
    f"--xla_force_host_platform_device_count={4 if mode == 'multi' else 8}"
    " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)
import jax  # noqa: E402

if mode == "multi":
    pid, port = int(sys.argv[2]), sys.argv[3]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", 2, pid)

import dataclasses  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import equinox as eqx  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import eqxtl  # noqa: E402
from eqxtl.io import checkpoint  # noqa: E402
from eqxtl.models import vit  # noqa: E402
from eqxtl.training import parallel, runs, train_state  # noqa: E402
from tests._tiny import TINY_VIT, random_tensors  # noqa: E402

work = Path(sys.argv[-1])
# the fits of one mesh compile the same programs: compiled once (per process)
jax.config.update(
    "jax_compilation_cache_dir", str(work / f"xla-cache-{mode}-{jax.process_index()}")
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
assert jax.device_count() == 8
# hidden size 256: the attention and MLP weights have at least 2**16 elements, split 8 ways
cfg = dataclasses.replace(
    TINY_VIT, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_hidden_layers=1
)
backbone, state = checkpoint.fill(
    checkpoint.skeleton(vit.VIT, cfg), random_tensors(vit.VIT, cfg, 0)
)
model = eqxtl.Classifier(backbone, 10, key=jax.random.key(1))
spec = jax.tree.map(eqx.is_inexact_array, model)  # full fine-tuning
rng = np.random.default_rng(0)
source = eqxtl.ArraySource(
    rng.integers(0, 255, (48, 16, 16, 3)).astype(np.uint8),
    rng.integers(0, 10, 48),
    [str(i) for i in range(10)],
)


def fit(steps, mesh, out_dir):
    loader = eqxtl.Loader(source, eqxtl.preprocessing_for(model), 16, num_workers=0)
    result = eqxtl.fit(
        model,
        state,
        train_data=loader,
        phases=[eqxtl.Phase(spec, optax.sgd(0.1, momentum=0.9), steps=steps)],
        checkpoint=eqxtl.Checkpoint(out_dir),
        runtime=eqxtl.Runtime(mesh=mesh, progress=False),
    )
    leaves = jax.tree.leaves(eqx.filter((result.model, result.opt_state), eqx.is_array))
    lines = (Path(out_dir) / "steps.jsonl").read_text().splitlines() if pid0 else []
    return {
        "params": [np.asarray(parallel.local(x)).tolist() for x in leaves],
        "losses": [json.loads(line)["loss"] for line in lines],
        "resumed_from": result.resumed_from,
    }


pid0 = jax.process_index() == 0
out = {}
if mode == "multi":
    fit(2, eqxtl.make_mesh(fsdp=8), work / "multi")
    if pid0:
        shutil.copytree(work / "multi", work / "multi-at-2", symlinks=True)
        (work / "multi-at-2" / ".lock").unlink(missing_ok=True)
    runs.barrier("copied")
    out["multi"] = fit(3, eqxtl.make_mesh(fsdp=8), work / "multi")
    out["writers"] = sorted(
        p.name for p in (work / "multi" / "last" / runs.TRAIN_STATE).glob("ocdbt.process_*")
    )
else:
    fsdp8 = eqxtl.make_mesh(fsdp=8)
    out["one_device"] = fit(3, None, work / "one")
    out["straight"] = fit(3, fsdp8, work / "straight")
    fit(2, fsdp8, work / "stopped")
    for name in ("other", "small"):
        shutil.copytree(work / "stopped", work / name, symlinks=True)
    out["resumed"] = fit(3, fsdp8, work / "stopped")
    out["four"] = fit(3, eqxtl.make_mesh(fsdp=4, devices=jax.devices()[:4]), work / "other")
    out["from_two_processes"] = fit(3, fsdp8, work / "multi-at-2")
    # a device that holds 1 MiB: the state (about 8 MB with its momenta) split 2 ways is not
    train_state.device_bytes_limit = lambda device: 2**20
    try:
        fit(3, eqxtl.make_mesh(data=4, fsdp=2), work / "small")
        out["small"] = None
    except eqxtl.TrainingError as e:
        out["small"] = str(e)
print(json.dumps(out))
