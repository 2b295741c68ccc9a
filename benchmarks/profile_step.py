"""Where one compiled training step spends its time, per XLA instruction.

Compiles eqxtl's full fine-tuning step (as ``steps.py`` builds it, random weights, batch 32;
``--workload lora``: r=8 adapters + head, as ``steps.py`` builds them; ``--workload eval``:
the forward and loss that ``make_eval_step`` compiles)
with ``xla_cpu_enable_xprof_traceme`` so that XLA:CPU records one trace event per thunk,
runs it under ``jax.profiler.trace(..., create_perfetto_trace=True)``, and joins the events
with the optimised HLO (``compiled.as_text()``): total milliseconds per kind of work
(YNNPACK fusions holding a dot or a convolution, loop fusions, reductions, copies) and the
slowest instructions with their shapes.

Independent thunks run concurrently, so events overlap: totals add up to more than the
step, and one event's length includes time shared with others. Compare totals between
variants of the same step, not single events.

    python benchmarks/profile_step.py --model dinov2_s14 [--workload eval] [--top 30] [--out DIR]
    python benchmarks/profile_step.py --model clip --workload lora --int8-base
    python benchmarks/profile_step.py --model clip --form packed   # fit's step form
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]


def _trace(
    model_name: str,
    batch_size: int,
    out: str,
    workload: str,
    int8_base: bool = False,
    form: str = "model",
) -> tuple[float, str]:
    import equinox as eqx
    import jax
    import optax
    import steps

    import eqxtl

    model, state, image = steps.build(model_name, False)
    batch = steps.make_batch(batch_size, image)
    options = {"xla_cpu_enable_xprof_traceme": True}
    if workload == "eval":
        loss_fn = eqxtl.task_loss()  # what make_eval_step compiles (it exposes no .lower)
        step = eqx.filter_jit(lambda m, s, b: loss_fn(m, s, b, None)[1][1])
        args = (model, state, batch)
    else:
        if workload == "lora":
            model = steps.lora_model(model, model_name)
        spec = steps.spec_for(model, workload)
        if int8_base:  # as steps.py --variant int8-base
            model = eqxtl.quantize(model, spec, "int8")
            spec = steps.spec_for(model, workload)
        optimizer = optax.adam(1e-3)
        opt_state = optimizer.init(eqx.filter(model, spec))
        step = eqxtl.make_step(eqxtl.task_loss(), optimizer, spec, donate=False)
        if form == "packed":  # fit's step form (make_step's step.pack)
            carry = step.pack(model, opt_state)
            passthrough = (carry.frozen, state, batch, jax.random.key(2), carry.layout)
            args = (passthrough, carry.params, carry.opt_state)
        else:
            trainable, frozen = eqx.partition(model, spec)
            args = ((frozen, state, batch, jax.random.key(2), None), trainable, opt_state)
        options |= eqxtl.training.step._step_compiler_options() or {}
    step = step if workload == "eval" else step.compiled
    compiled = step.lower(*args).compile(compiler_options=options)
    jax.block_until_ready(compiled(*args))
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    seconds = time.perf_counter() - start
    with jax.profiler.trace(out, create_perfetto_trace=True):
        jax.block_until_ready(compiled(*args))
    return seconds, compiled.compiled.as_text()


def _instructions(hlo: str) -> tuple[dict, dict]:
    """``name -> (shape, opcode, rest of line)`` and ``computation name -> body``."""
    computations = {
        m.group(1).lstrip("%"): m.group(2)
        for m in re.finditer(r"^(%?[\w.\-]+) \([^\n]*\{\n(.*?)\n\}", hlo, re.S | re.M)
    }
    instructions = {
        m.group(1): (m.group(2), m.group(3), m.group(4))
        for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) (\S+?)\((.*)$", hlo, re.M)
    }
    return instructions, computations


def _kind(name: str, instructions: dict, computations: dict) -> str | None:
    if name not in instructions:
        return None
    _, opcode, rest = instructions[name]
    called = re.search(r"calls=%?([\w.\-]+)", rest)
    body = computations.get(called.group(1), "") if called else rest
    library = "ynn " if "__ynn_fusion" in rest else ""
    if "convolution(" in body:
        return library + "convolution"
    if " dot(" in body or opcode == "dot":
        return library + "dot"
    if "reduce-window" in body or "select-and-scatter" in body:
        return "pooling"
    if " reduce(" in body or opcode == "reduce":
        return "reduce"
    if name.startswith(("transpose", "copy")) or opcode in ("copy", "transpose"):
        return "transpose / copy"
    return "loop fusion" if "kind=kLoop" in rest else opcode


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="resnet50", choices=("resnet50", "clip", "vit_b16", "dinov2_s14")
    )
    parser.add_argument("--workload", default="full", choices=("full", "lora", "eval"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default=None, help="trace folder (default: a temporary one)")
    parser.add_argument(
        "--int8-base", action="store_true", help="the frozen base stored as int8 (lora only)"
    )
    parser.add_argument(
        "--form",
        default="model",
        choices=("model", "packed"),
        help="packed: fit's step form (step.pack); model: step(model, ...)",
    )
    args = parser.parse_args(argv)
    if args.int8_base and args.workload != "lora":
        parser.error("--int8-base needs --workload lora (a frozen base)")
    out = args.out or tempfile.mkdtemp(prefix="eqxtl-profile-")
    seconds, hlo = _trace(
        args.model, args.batch_size, out, args.workload, args.int8_base, args.form
    )
    with open(os.path.join(out, "optimised.hlo.txt"), "w") as f:
        f.write(hlo)
    trace = glob.glob(os.path.join(out, "plugins", "profile", "*", "*.trace.json.gz"))[0]
    events = [e for e in json.load(gzip.open(trace))["traceEvents"] if e.get("ph") == "X"]
    instructions, computations = _instructions(hlo)
    per_kind, per_name, calls = collections.Counter(), collections.Counter(), collections.Counter()
    for event in events:
        kind = _kind(event["name"], instructions, computations)
        if kind is not None:
            per_kind[kind] += event["dur"] / 1e3
            per_name[event["name"]] += event["dur"] / 1e3
            calls[kind] += 1
    print(
        f"{args.model} {args.workload}, batch {args.batch_size}: step {seconds:.2f} s "
        f"(untraced); trace and optimised HLO in {out}"
    )
    print("\nms (summed over concurrent thunks) per kind of instruction:")
    for kind, ms in per_kind.most_common():
        print(f"{ms:9.1f}  {calls[kind]:5d}  {kind}")
    print(f"\nslowest {args.top} instructions:")
    for name, ms in per_name.most_common(args.top):
        shape, opcode, _ = instructions[name]
        kind = _kind(name, instructions, computations)
        print(f"{ms:9.1f}  {name[:40]:40s} {shape[:44]:44s} {kind}")


if __name__ == "__main__":
    main()
