"""Where ResNet-50's training step loses time on XLA:CPU: its convolutions, one by one.

For representative ResNet-50 convolution shapes (batch 32), times the forward pass, the
gradient with respect to the input (``dx``) and the gradient with respect to the kernel
(``dw``), in JAX with several layouts (eqxtl's ``NHWC`` + ``OIHW`` kernel, ``NHWC`` +
``HWIO``, Equinox's default ``NCHW`` + ``OIHW``) and in PyTorch (``NCHW`` contiguous and
``channels_last``), and prints GFLOP/s per (shape, pass, implementation) as JSON lines and
a table.

``--hlo`` instead compiles eqxtl's ResNet-50 full fine-tune step and summarises XLA's
optimised HLO: how many convolutions of each kind, how they are emitted (plain HLO
``convolution`` vs library custom calls), and the transposes/copies around them.

``--xla-flags "..."`` runs the JAX part under other ``XLA_FLAGS`` (in a child process),
e.g. ``--xla-flags "--xla_cpu_use_onednn=true"``.

    python benchmarks/profile_convs.py [--frameworks jax torch] [--reps 3]
    python benchmarks/profile_convs.py --hlo
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import statistics
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]

import _common as C  # noqa: E402

BATCH = 32
# name, input size, in channels, out channels, kernel, stride (ResNet-50 v1.5)
SHAPES = [
    ("stem 7x7/2 3->64 @224", 224, 3, 64, 7, 2),
    ("1x1 64->64 @56", 56, 64, 64, 1, 1),
    ("3x3 64->64 @56", 56, 64, 64, 3, 1),
    ("1x1 64->256 @56", 56, 64, 256, 1, 1),
    ("3x3/2 128->128 @56", 56, 128, 128, 3, 2),
    ("1x1 512->128 @28", 28, 512, 128, 1, 1),
    ("3x3 256->256 @14", 14, 256, 256, 3, 1),
    ("1x1 1024->256 @14", 14, 1024, 256, 1, 1),
    ("3x3 512->512 @7", 7, 512, 512, 3, 1),
]
JAX_LAYOUTS = {
    "jax NHWC/OIHW (eqxtl)": ("NHWC", "OIHW", "NHWC"),
    "jax NHWC/HWIO": ("NHWC", "HWIO", "NHWC"),
    "jax NCHW/OIHW (eqx.nn)": ("NCHW", "OIHW", "NCHW"),
}


def _flops(h, cin, cout, k, s):
    out = (h + 2 * (k // 2) - k) // s + 1
    return 2.0 * BATCH * out * out * cout * cin * k * k


def _median_time(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _jax_case(name, h, cin, cout, k, s, impl, dn, reps) -> None:
    import jax
    import jax.numpy as jnp

    flops = _flops(h, cin, cout, k, s)
    lhs_spec, rhs_spec, _ = dn
    xshape = {"NHWC": (BATCH, h, h, cin), "NCHW": (BATCH, cin, h, h)}[lhs_spec]
    wshape = {"OIHW": (cout, cin, k, k), "HWIO": (k, k, cin, cout)}[rhs_spec]
    pad = ((k // 2, k // 2), (k // 2, k // 2))

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (s, s), pad, dimension_numbers=dn)

    def loss(x, w, g):
        return jnp.vdot(conv(x, w), g)

    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, xshape)
    w = jax.random.normal(kw, wshape) * 0.01
    g = jnp.ones(jax.eval_shape(conv, x, w).shape)
    cases = {
        "fwd": (jax.jit(conv), (x, w)),
        "dx": (jax.jit(jax.grad(loss, 0)), (x, w, g)),
        "dw": (jax.jit(jax.grad(loss, 1)), (x, w, g)),
    }
    for kind, (fn, args) in cases.items():
        t = _median_time(lambda fn=fn, args=args: fn(*args).block_until_ready(), reps)
        _emit(name, impl, kind, t, flops, xla_flags=os.environ.get("XLA_FLAGS", ""))


def _emit(name, impl, kind, seconds, flops, **extra) -> None:
    C.emit(
        {
            "kind": "conv",
            "shape": name,
            "impl": impl,
            "pass": kind,
            "ms": round(seconds * 1e3, 2),
            "gflops_per_s": round(flops / seconds / 1e9, 1),
            **extra,
        }
    )


def jax_convs(reps: int) -> None:
    for shape in SHAPES:
        for impl, dn in JAX_LAYOUTS.items():
            _jax_case(*shape, impl, dn, reps)


def _torch_case(name, h, cin, cout, k, s, impl, fmt, reps) -> None:
    import torch
    import torch.nn.functional as F

    flops = _flops(h, cin, cout, k, s)
    x0 = torch.randn(BATCH, cin, h, h).to(memory_format=fmt)
    w0 = (torch.randn(cout, cin, k, k) * 0.01).to(memory_format=fmt)
    with torch.no_grad():
        g = torch.ones_like(F.conv2d(x0, w0, stride=s, padding=k // 2))

    def fwd():
        with torch.no_grad():
            F.conv2d(x0, w0, stride=s, padding=k // 2)

    def grad(wrt):
        x = x0.detach().requires_grad_(wrt == "dx")
        w = w0.detach().requires_grad_(wrt == "dw")
        F.conv2d(x, w, stride=s, padding=k // 2).backward(g)

    t_fwd = _median_time(fwd, reps)
    for kind in ("fwd", "dx", "dw"):
        if kind == "fwd":
            t = t_fwd
        else:  # the backward call also ran a forward: take it out
            t = max(_median_time(lambda kind=kind: grad(kind), reps) - t_fwd, 1e-9)
        _emit(name, impl, kind, t, flops)


def torch_convs(reps: int) -> None:
    import torch

    torch.set_num_threads(os.cpu_count())
    formats = (
        ("torch NCHW", torch.contiguous_format),
        ("torch channels_last", torch.channels_last),
    )
    for shape in SHAPES:
        for impl, fmt in formats:
            _torch_case(*shape, impl, fmt, reps)


def hlo_summary() -> None:
    """Compile eqxtl's ResNet-50 full step; summarise the optimised HLO."""
    import equinox as eqx
    import jax
    import optax
    from steps import build, make_batch

    import eqxtl

    model, state, image = build("resnet50", quick=False)
    batch = make_batch(BATCH, image)
    spec = eqxtl.everything(model)
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(eqx.filter(model, spec))
    step = eqxtl.make_step(eqxtl.task_loss(), optimizer, spec)
    trainable, frozen = eqx.partition(model, spec)
    lowered = step.compiled.lower(
        (frozen, state, batch, jax.random.key(0), None), trainable, opt_state
    )
    text = lowered.compile().compiled.as_text()
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), "eqxtl_resnet50_full_step.hlo.txt")
    with open(path, "w") as f:
        f.write(text)
    convs = re.findall(r"= (\S+) convolution\(.*?dim_labels=(\S+?)[,}\s]", text)
    customs = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', text))
    transposes = re.findall(r"= (\S+) transpose\(", text)
    copies = re.findall(r"= (\S+) copy\(", text)

    def nbytes(shape: str) -> int:
        m = re.match(r"(f32|bf16|f16|s32)\[([\d,]*)\]", shape)
        if not m:
            return 0
        size = {"f32": 4, "s32": 4, "bf16": 2, "f16": 2}[m.group(1)]
        for d in filter(None, m.group(2).split(",")):
            size *= int(d)
        return size

    C.emit(
        {
            "kind": "hlo",
            "file": path,
            "convolutions": len(convs),
            "conv_dim_labels": dict(collections.Counter(lbl for _, lbl in convs)),
            "custom_calls": dict(customs),
            "transposes": len(transposes),
            "transpose_mb": round(sum(nbytes(s) for s in transposes) / 2**20, 1),
            "copies": len(copies),
            "copy_mb": round(sum(nbytes(s) for s in copies) / 2**20, 1),
            "fusions": len(re.findall(r"= \S+ fusion\(", text)),
        }
    )


def table(records: list[dict]) -> str:
    impls = list(dict.fromkeys(r["impl"] for r in records if r.get("kind") == "conv"))
    by = {(r["shape"], r["pass"], r["impl"]): r for r in records if r.get("kind") == "conv"}
    lines = ["| shape | pass | " + " | ".join(impls) + " |", "|---|---|" + "---|" * len(impls)]
    for name, *_ in SHAPES:
        for kind in ("fwd", "dx", "dw"):
            cells = [
                str(by[(name, kind, i)]["gflops_per_s"]) if (name, kind, i) in by else "—"
                for i in impls
            ]
            lines.append(f"| {name} | {kind} | " + " | ".join(cells) + " |")
    return "GFLOP/s (batch 32):\n" + "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frameworks", nargs="+", default=["jax", "torch"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--hlo", action="store_true")
    parser.add_argument("--xla-flags", default=None)
    parser.add_argument("--child", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.hlo:
        hlo_summary()
        return
    if args.child == "jax":
        jax_convs(args.reps)
        return
    if args.child == "torch":
        torch_convs(args.reps)
        return
    records = []
    for fw in args.frameworks:
        env = {"XLA_FLAGS": args.xla_flags} if (fw == "jax" and args.xla_flags) else None
        cmd = [sys.executable, __file__, "--child", fw, "--reps", str(args.reps)]
        records += C.run_children([cmd], env=env, on_line=C.emit)
    print(table(records))


if __name__ == "__main__":
    main()
