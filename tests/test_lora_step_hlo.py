"""Structural facts of compiled train steps (issue 22): what XLA computes, not how fast.

- no weight gradient of a frozen layer: no dot produces a frozen weight's shape;
- the backward pass of the residual stream does not grow with depth: unrolled, the largest
  elementwise fusion of an 8-block model is no larger than a 4-block one's (unbroken, the
  fusion ``l`` blocks from the top recomputes the whole gradient chain above it:
  ``eqxtl.models.layers.schedule.stored_gradient``);
- skipping non-finite steps does not grow the program: a select per leaf on "every gradient
  is finite" let XLA copy the gradients' producers into the selects (CLIP-B/32's full step
  compiled to ~10x the instructions); ``make_step`` uses one conditional instead.
"""

import dataclasses
import re

import equinox as eqx
import jax
import numpy as np
import optax

import eqxtl
from eqxtl.models import clip
from tests._tiny import TINY_CLIP

WIDTH, HIDDEN = 48, 80  # shapes no activation has (rows: batch 2 x 5 tokens)


def _compiled_step(
    layers: int, *, lora: bool = True, skip_nonfinite: bool = True, scan: bool = False
) -> str:
    config = dataclasses.replace(
        TINY_CLIP,
        hidden_size=WIDTH,
        intermediate_size=HIDDEN,
        num_hidden_layers=layers,
        image_size=32,
        patch_size=16,
    )
    backbone, state = eqx.nn.make_with_state(clip.CLIP_VISION.build)(config, jax.random.key(0))
    backbone = eqxtl.with_scan(eqx.nn.inference_mode(backbone, True), scan)
    model = eqxtl.Classifier(backbone, 3, key=jax.random.key(1))
    if lora:
        model = eqxtl.lora(model, r".*\.(q_proj|v_proj)", rank=4, key=jax.random.key(2))
    spec = eqxtl.lora_spec(model, "head") if lora else eqxtl.everything(model)
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(eqx.filter(model, spec))
    step = eqxtl.make_step(eqxtl.task_loss(), optimizer, spec, skip_nonfinite=skip_nonfinite)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(2, 3, 32, 32)).astype(np.float32),
        "label": np.array([0, 2], np.int32),
    }
    return step.lower(model, state, opt_state, batch).compile().as_text()


def _largest_loop_fusion(hlo: str) -> int:
    bodies = {
        m.group(1).lstrip("%"): m.group(2)
        for m in re.finditer(r"^(%?[\w.\-]+) \([^\n]*\{\n(.*?)\n\}", hlo, re.S | re.M)
    }
    called = re.findall(r"fusion\(.*kind=k(?:Loop|Input), calls=%?([\w.\-]+)", hlo)
    assert called, "no loop fusion found: the HLO text format changed"
    return max(bodies[c].count("\n") + 1 for c in called)


def test_lora_step_structure():
    hlo4, hlo8 = _compiled_step(4), _compiled_step(8)
    frozen = {(WIDTH, WIDTH), (HIDDEN, WIDTH), (WIDTH, HIDDEN)}
    dots = re.findall(r"= f32\[([\d,]*)\]\{[\d,]*\} dot\(", hlo8)
    assert dots
    shapes = {tuple(int(d) for d in s.split(",")) for s in dots}
    assert not shapes & frozen, f"a frozen weight's gradient is computed: {shapes & frozen}"
    assert _largest_loop_fusion(hlo8) <= _largest_loop_fusion(hlo4)


def _instructions(hlo: str) -> int:
    return len(re.findall(r"^\s+(?:ROOT )?%?[\w.\-]+ = ", hlo, re.M))


def test_skipping_nonfinite_steps_does_not_grow_the_program():
    guarded = _instructions(_compiled_step(4, lora=False, scan=True))
    plain = _instructions(_compiled_step(4, lora=False, skip_nonfinite=False, scan=True))
    assert guarded <= 1.2 * plain, (guarded, plain)
