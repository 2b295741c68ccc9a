"""Where a train step's memory goes: ``eqxtl.memory_report`` of the compiled step (XLA's
buffer assignment: arguments, outputs, donated aliases, temporaries), for each model and
variant of ``make_step``, from shapes alone (no weights, no batch, nothing run), so the
figures do not depend on the machine's load. Batch 32, 224x224, Adam, everything trains
(``full``) unless ``--workloads`` says otherwise.

Variants (``--variants``): ``default`` (``make_step`` as ``fit`` builds it),
``no-donate`` (``donate=False``), ``no-skip`` (``skip_nonfinite=False``), ``remat``
(``eqxtl.with_remat``: blocks recomputed in the backward pass). Each (model, workload,
variant) compiles in a fresh process (``--in-process`` for one process) and prints one JSON
line in MiB, plus the process's peak RSS (the compiler's own memory: nothing runs).

    python benchmarks/memory.py --models clip resnet50
    python benchmarks/memory.py --models resnet50 --variants default no-skip --dump /tmp/hlo

``--rss``: instead, the process's resident memory along a real step's life (built with
random weights, compiled, two steps run), with and without ``make_step``'s trim of the
compiler's freed memory, one fresh process each; then PyTorch's peak RSS for the same step
(``torch_reference.py``, one warm-up call and two steps: a single call would peak before
Adam's moments exist, 0.67 GB low for CLIP-B/32).

``--dump DIR``: XLA's dump of each compiled step (``--xla_dump_to``, with the buffer
assignment: ``*buffer-assignment.txt``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]

import _common as C  # noqa: E402

VARIANTS = ("default", "no-donate", "no-skip", "remat")


def report(model_name: str, workload: str, variant: str, batch_size: int, quick: bool):
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import optax
    import steps

    import eqxtl

    holder = {}

    def build():
        model, state, image = steps.build(model_name, quick)
        holder["image"] = image
        return model, state

    if workload == "lora":  # eqxtl.lora draws its adapters from concrete weights
        model, state = build()
        model = steps.lora_model(model, model_name)
    else:
        model, state = eqx.filter_eval_shape(build)  # shapes only: nothing is initialised
    if variant == "remat":
        model = eqxtl.with_remat(model)
    spec = steps.spec_for(model, workload)
    optimizer = optax.adam(1e-3)
    opt_state = jax.eval_shape(optimizer.init, eqx.filter(model, spec))
    options = {"donate": False} if variant == "no-donate" else {}
    options |= {"skip_nonfinite": False} if variant == "no-skip" else {}
    step = eqxtl.make_step(eqxtl.task_loss(), optimizer, spec, **options)
    image = holder["image"]
    batch = {
        "image": jax.ShapeDtypeStruct((batch_size, 3, image, image), jnp.float32),
        "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
    }
    result = eqxtl.memory_report(step, model, state, opt_state, batch)
    mib = {k: round(v / 2**20, 1) for k, v in vars(result).items() if not isinstance(v, bool)}
    record = {"model": model_name, "workload": workload, "variant": variant}
    record |= {"batch": batch_size, **mib, "donated": result.donated}
    record |= {"compile_peak_rss_mb": round(C.peak_rss_mb(), 1), "load": os.getloadavg()[0]}
    C.emit(record)
    print(result, file=sys.stderr)


def rss(model_name: str, trim: str, batch_size: int, quick: bool) -> None:
    import equinox as eqx
    import jax
    import optax
    import steps

    import eqxtl
    from eqxtl._util import heap

    heap.enabled = trim == "trim"

    def current_mb():
        with open("/proc/self/statm") as f:
            return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20)

    record = {"model": model_name, "workload": "full", "trim": trim == "trim"}
    model, state, image = steps.build(model_name, quick)
    batch = steps.make_batch(batch_size, image)
    spec = eqxtl.everything(model)
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(eqx.filter(model, spec))
    step = eqxtl.make_step(eqxtl.task_loss(), optimizer, spec)
    record |= {"built_mb": current_mb()}
    trainable, frozen = eqx.partition(model, spec)
    args = ((frozen, state, batch, jax.random.key(2), None), trainable, opt_state)
    step.compiled.lower(*args).compile()  # the compilation the first call then reuses
    del trainable, frozen, args
    record |= {"compiled_mb": current_mb(), "compile_peak_rss_mb": round(C.peak_rss_mb())}
    carry = [model, state, opt_state]
    del model, opt_state
    for _ in range(2):
        *carry, metrics = step(*carry, batch, jax.random.key(2))
        jax.block_until_ready(metrics)
    record |= {"peak_rss_mb": round(C.peak_rss_mb()), "load": os.getloadavg()[0]}
    C.emit(record)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["clip", "resnet50"])
    parser.add_argument("--workloads", nargs="+", default=["full"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--batch-size", type=int, default=C.BATCH)
    parser.add_argument("--quick", action="store_true", help="tiny configs, 32x32")
    parser.add_argument("--in-process", action="store_true")
    parser.add_argument("--dump", help="XLA dump folder (buffer assignment, HLO)")
    parser.add_argument("--rss", action="store_true", help="peak RSS, trim vs no trim")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        if args.child[1] == "rss":
            rss(args.child[0], args.child[2], args.batch_size, args.quick)
        else:
            report(*args.child[:3], args.batch_size, args.quick)
        return
    if args.rss:
        args.workloads, args.variants = ["rss"], ["trim", "no-trim"]
    for model in args.models:
        if args.rss:
            _torch_rss(model, args)
        for workload in args.workloads:
            for variant in args.variants:
                if args.in_process:
                    report(model, workload, variant, args.batch_size, args.quick)
                    continue
                env = dict(os.environ)
                if args.dump:
                    where = os.path.join(args.dump, f"{model}-{workload}-{variant}")
                    flags = f"--xla_dump_to={where} --xla_dump_hlo_as_text"
                    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
                cmd = [sys.executable, __file__, "--child", model, workload, variant]
                cmd += ["--batch-size", str(args.batch_size)] + (["--quick"] if args.quick else [])
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                sys.stdout.write(done.stdout)
                if done.returncode:
                    sys.stderr.write(done.stderr[-3000:])
                    print(json.dumps({"model": model, "variant": variant, "error": True}))


def _torch_rss(model: str, args) -> None:
    """PyTorch's peak RSS for the same full step, in its own process (after eqxtl's runs
    would do as well: each process is fresh)."""
    cmd = [sys.executable, os.path.join(_HERE, "torch_reference.py"), "--child"]
    cmd += ["--models", model, "--workloads", "full", "--rounds", "1", "--steps", "2"]
    cmd += ["--warmup", "1", "--no-flops", "--batch-size", str(args.batch_size)]
    cmd += ["--quick"] if args.quick else []
    done = subprocess.run(cmd, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            keep = ("framework", "model", "workload", "peak_rss_mb", "sec_per_step")
            print(json.dumps({k: record.get(k) for k in keep} | {"load": os.getloadavg()[0]}))
    if done.returncode:
        sys.stderr.write(done.stderr[-3000:])


if __name__ == "__main__":
    main()
