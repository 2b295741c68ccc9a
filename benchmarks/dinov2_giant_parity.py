"""DINOv2-g/14 (facebook/dinov2-giant's config: 40 blocks, width 1536, SwiGLU MLP, 1.14 B
parameters) against transformers, once, at its real size: not a test (about 10 GB of memory
at peak, a few minutes on 2 cores).

transformers builds the model with its own random init (norm scales, biases, layer scales
and the class token perturbed so that every tensor matters), runs one 224x224 image and
writes its hub files (``model.safetensors`` with ``weights_in`` / ``weights_out``,
``config.json``); its model is freed; ``eqxtl.from_pretrained`` reads the folder and runs the
same image. Prints one JSON record: max absolute and relative differences of the pooled
features (``pooler_output``) and of every token (``last_hidden_state``), peak RSS after each
side, seconds per phase.

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 python benchmarks/dinov2_giant_parity.py [--dir DIR]
"""

import argparse
import gc
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import _common as C  # the scripts run from benchmarks/ (python benchmarks/NAME.py)
import numpy as np


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def torch_side(folder: Path, x: np.ndarray, seed: int) -> tuple[dict, dict]:
    import torch
    import transformers

    torch.manual_seed(seed)
    times = {}
    start = time.perf_counter()
    config = transformers.Dinov2Config(**C.DINOV2_G14_HF, image_size=518)
    model = transformers.Dinov2Model(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lambda1" in name:  # layer scales: 0.5 + 0.1 N
                p.copy_(0.5 + 0.1 * torch.randn(p.shape, generator=g))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "cls_token" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    times["torch_init_s"] = time.perf_counter() - start
    parameters = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(x))
    times["torch_forward_s"] = time.perf_counter() - start
    want = {
        "pooled": out.pooler_output.numpy().copy(),
        "hidden": out.last_hidden_state.numpy().copy(),
    }
    start = time.perf_counter()
    model.save_pretrained(folder, max_shard_size="100GB")  # one file
    times["torch_save_s"] = time.perf_counter() - start
    del model, out
    gc.collect()
    return want, {**times, "parameters_transformers": parameters}


def eqxtl_side(folder: Path, x: np.ndarray) -> tuple[dict, dict]:
    import equinox as eqx
    import jax

    import eqxtl

    times = {}
    start = time.perf_counter()
    model, state = eqxtl.from_pretrained(folder)
    times["eqxtl_load_s"] = time.perf_counter() - start
    assert model.config.use_swiglu_ffn and model.config.intermediate_size == 4096
    parameters = sum(leaf.size for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_array)))

    @eqx.filter_jit
    def run(m, x):
        return m.hidden_states(x), m(x, state)[0]

    start = time.perf_counter()
    jax.block_until_ready(run(model, x))
    times["eqxtl_compile_and_forward_s"] = time.perf_counter() - start
    start = time.perf_counter()
    hidden, pooled = jax.block_until_ready(run(model, x))
    times["eqxtl_forward_s"] = time.perf_counter() - start  # both outputs: two passes
    return {"pooled": np.asarray(pooled), "hidden": np.asarray(hidden)}, {
        **times,
        "parameters_eqxtl": parameters,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=None, help="where the 4.5 GB files go")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(dir=args.dir))
    x = np.random.default_rng(args.seed).normal(size=(1, 3, 224, 224)).astype(np.float32)
    record = {"benchmark": "dinov2_giant_parity", "batch": 1, "image": 224}
    try:
        want, times = torch_side(root, x, args.seed)
        record |= times | {"peak_rss_mb_after_torch": round(_peak_mb())}
        got, times = eqxtl_side(root, x)
        record |= times | {"peak_rss_mb": round(_peak_mb())}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for name in ("pooled", "hidden"):
        a, b = got[name].astype(np.float64), want[name].astype(np.float64)
        assert a.shape == b.shape, (name, a.shape, b.shape)
        diff = float(np.max(np.abs(a - b)))
        record[f"{name}_max_abs"] = diff
        record[f"{name}_max_rel"] = diff / float(np.max(np.abs(b)))
    record["ok_1e-4"] = max(record["pooled_max_rel"], record["hidden_max_rel"]) <= 1e-4
    print(
        json.dumps(
            {k: round(v, 3) if isinstance(v, float) and v > 1e-2 else v for k, v in record.items()}
        )
    )


if __name__ == "__main__":
    main()
