"""Where a scanned train step loses time and memory: CLIP-B/32's encoder blocks (or
L/14's: ``--config l14``), full fine-tuning with Adam on a ``(batch, 50, 768)`` token input
(``(batch, 257, 1024)``), one variant per process.

Variants:

- ``unrolled``: one copy per block (``run_blocks(scan=False)``);
- ``scan``: the blocks stacked inside the traced step and scanned (what eqxtl does);
- ``stacked``: the blocks *stored* stacked (one ``(layers, ...)`` array per weight, and
  Adam's state with them) and scanned: no stacking in the step, no slicing of gradients;

each optionally with a ``jax.checkpoint`` policy around the block (``_dots``:
``dots_saveable``; ``_nbdots``: ``dots_with_no_batch_dims_saveable``, what eqxtl's scan body
uses). ``--rowwise`` (``stacked`` only): Adam runs once per row, ``jax.vmap``-ed over the
stacked blocks (``eqxtl.tuning._rowwise.Vectorised``: what a user's optax transformation
would run as under stacked storage), instead of on the stacked leaves. Prints one JSON line:
compile seconds, seconds per step (median of 3 rounds of 3 steps), XLA's temporary bytes,
peak RSS.

    for v in unrolled scan stacked scan_nbdots stacked_nbdots; do
        python benchmarks/scan_storage.py $v --batch 32 --layers 12; done
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from eqxtl.models import clip
from eqxtl.models._clip_model import EncoderLayer
from eqxtl.models.blockwise import run_blocks
from eqxtl.tuning._rowwise import Vectorised

CONFIGS = {"b32": (clip.CLIP_VIT_B32, 50), "l14": (clip.CLIP_VIT_L14, 257)}

POLICIES = {
    "dots": jax.checkpoint_policies.dots_saveable,
    "nbdots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
STORAGES = ("unrolled", "scan", "stacked")
VARIANTS = STORAGES + tuple(f"{s}_{p}" for s in STORAGES for p in POLICIES)


def encoder(variant: str, layers: int, config: str = "b32"):
    """``(params, encode)``: the blocks' weights (and a zero head) and ``encode(weights, h)``."""
    storage, _, policy = variant.partition("_")
    base = CONFIGS[config][0]
    blocks = [EncoderLayer(base, k) for k in jax.random.split(jax.random.key(0), layers)]
    call = lambda layer, h: layer(h)  # noqa: E731
    if policy:
        call = jax.checkpoint(call, policy=POLICIES[policy])
    statics = [eqx.partition(b, eqx.is_array)[1] for b in blocks]
    weights = [eqx.filter(b, eqx.is_array) for b in blocks]
    if storage == "stacked":

        def encode(stacked, h):
            def body(carry, w):
                return call(eqx.combine(w, statics[0]), carry), None

            return jax.lax.scan(body, h, stacked)[0]

        weights = jax.tree.map(lambda *xs: jnp.stack(xs), *weights)
    else:

        def encode(per_block, h):
            blocks = [eqx.combine(w, s) for w, s in zip(per_block, statics, strict=True)]
            return run_blocks(call, blocks, h, scan=storage == "scan")

    return (weights, jnp.zeros((base.hidden_size, 3))), encode


def rowwise(optimizer, params, layers: int):
    """``optimizer`` run once per row over the stacked blocks of ``params`` (``stacked``
    storage), as an optax transformation of the stacked tree."""
    stacked, head = params
    row = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), stacked)
    per_row = ([row] * layers, jax.ShapeDtypeStruct(head.shape, head.dtype))
    n = len(jax.tree.leaves(row))
    vec = Vectorised(optimizer, per_row, [[list(range(r * n, (r + 1) * n)) for r in range(layers)]])
    treedef = jax.tree.structure(stacked)

    def to_packed(tree):
        return [jax.tree.leaves(tree[0])], [tree[1]]

    def from_packed(packed):
        return jax.tree.unflatten(treedef, packed[0][0]), packed[1][0]

    def update(grads, state, params):
        updates, state = vec.update(to_packed(grads), state, to_packed(params))
        return from_packed(updates), state

    return optax.GradientTransformation(lambda p: vec.init(to_packed(p)), update)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="b32")
    parser.add_argument("--rowwise", action="store_true")
    args = parser.parse_args()
    if args.rowwise and not args.variant.startswith("stacked"):
        parser.error("--rowwise: only with a stacked variant (stored stacked)")
    params, encode = encoder(args.variant, args.layers, args.config)
    optimizer = optax.adam(1e-4)
    if args.rowwise:
        optimizer = rowwise(optimizer, params, args.layers)

    def loss(p, x, y):
        logits = encode(p[0], x)[:, 0] @ p[1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(x, p, s, y):
        value, grads = jax.value_and_grad(loss)(p, x, y)
        updates, s = optimizer.update(grads, s, p)
        return optax.apply_updates(p, updates), s, value

    base, tokens = CONFIGS[args.config]
    x = jax.random.normal(jax.random.key(1), (args.batch, tokens, base.hidden_size))
    y = jnp.zeros((args.batch,), jnp.int32)
    state = optimizer.init(params)
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(1, 2)).lower(x, params, state, y).compile()
    compile_s = time.perf_counter() - start
    params, state, value = compiled(x, params, state, y)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(3):
            params, state, value = compiled(x, params, state, y)
        value.block_until_ready()
        times.append((time.perf_counter() - start) / 3)
    record = dict(
        variant=args.variant + ("_rowwise" if args.rowwise else ""),
        config=args.config,
        batch=args.batch,
        layers=args.layers,
        compile_s=round(compile_s, 2),
        sec_per_step=round(sorted(times)[1], 3),
        temp_mb=round(compiled.memory_analysis().temp_size_in_bytes / 2**20),
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    )
    print(json.dumps(record))


if __name__ == "__main__":
    main()
