"""Scanned blocks (the default; ``eqxtl.with_scan``): the same values, gradients, names and
files as the unrolled model (``with_scan(model, False)``); frozen blocks stay out of the
backward pass; the compiled step does not grow with depth."""

import dataclasses
import filecmp
import os
import warnings

import equinox as eqx
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqxtl
from eqxtl.io import checkpoint
from eqxtl.models import clip
from tests._tiny import TINY_CLIP, random_tensors, tiny

IMAGE = 32
NUM_CLASSES = 3


def classifier(config=None, seed: int = 0):
    if config is None:
        backbone, state = tiny("clip", seed)
    else:
        tensors = random_tensors(clip.CLIP_VISION, config, seed)
        backbone, state = checkpoint.fill(checkpoint.skeleton(clip.CLIP_VISION, config), tensors)
    return eqxtl.Classifier(backbone, NUM_CLASSES, key=jax.random.key(1)), state


def batch(seed: int = 0, size: int = 4):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(size, 3, IMAGE, IMAGE)).astype(np.float32),
        "label": rng.integers(0, NUM_CLASSES, size).astype(np.int32),
    }


def grad_fn(spec):
    loss_fn = eqxtl.task_loss()

    def run(trainable, frozen, state, data):
        def loss_of(t):
            return loss_fn(eqx.combine(t, frozen), state, data, None)[0]

        return eqx.filter_value_and_grad(loss_of)(trainable)

    return run


def loss_and_grads(model, state, spec=None):
    spec = eqxtl.everything(model) if spec is None else spec
    trainable, frozen = eqx.partition(model, spec)
    return eqx.filter_jit(grad_fn(spec))(trainable, frozen, state, batch())


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    la = jax.tree.leaves(eqx.filter(a, eqx.is_array))
    lb = jax.tree.leaves(eqx.filter(b, eqx.is_array))
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def model_state():
    return classifier()


def scans_in(jaxpr) -> list[int]:
    """Lengths of every ``scan`` in a closed jaxpr, nested ones included."""
    found = []

    def visit(jp):
        for eqn in jp.eqns:
            if eqn.primitive.name == "scan":
                found.append(eqn.params["length"])
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jaxpr.jaxpr)
    return found


def count_dots(jaxpr, batched: bool = False) -> int:
    """``dot_general`` equations in a closed jaxpr, each sub-jaxpr (a scan body) once;
    ``batched``: only those with batch dimensions (attention's, not the weights')."""
    n = 0

    def visit(jp):
        nonlocal n
        for eqn in jp.eqns:
            if eqn.primitive.name == "dot_general":
                n += not batched or bool(eqn.params["dimension_numbers"][1][0])
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jaxpr.jaxpr)
    return n


def test_flag_names_and_files_unchanged(model_state, tmp_path):
    model, state = model_state
    scanned = eqxtl.with_scan(model)
    assert scanned.backbone.encoder.scan and model.backbone.encoder.scan is None  # default
    assert not eqxtl.with_scan(scanned, False).backbone.encoder.scan
    # The same pytree: per-layer names everywhere, arrays shared.
    assert eqxtl.paths(scanned) == eqxtl.paths(model)
    assert "backbone.encoder.layers.3.mlp.fc1.weight" in eqxtl.paths(scanned)
    assert list(eqxtl.state_dict(scanned.backbone)) == list(eqxtl.state_dict(model.backbone))
    assert eqxtl.blocks(scanned) == eqxtl.blocks(model)
    # save -> load -> save gives byte-identical files, scanned or not.
    eqxtl.save_pretrained(model, state, tmp_path / "plain")
    eqxtl.save_pretrained(scanned, state, tmp_path / "scanned")
    names = sorted(os.listdir(tmp_path / "plain"))
    assert names == sorted(os.listdir(tmp_path / "scanned"))
    match, mismatch, errors = filecmp.cmpfiles(
        tmp_path / "plain", tmp_path / "scanned", names, shallow=False
    )
    assert mismatch == [] and errors == [] and match == names
    loaded, loaded_state = eqxtl.from_pretrained(tmp_path / "scanned", keep_head=True)
    loaded = eqxtl.with_scan(loaded)
    assert eqxtl.paths(loaded) == eqxtl.paths(model)
    eqxtl.save_pretrained(loaded, loaded_state, tmp_path / "again")
    assert (
        filecmp.cmpfiles(tmp_path / "plain", tmp_path / "again", names, shallow=False)[0] == names
    )


def test_remat_inside_the_scan_body(model_state):
    """Scan and remat together (each block checkpointed inside the scan body): the unrolled
    gradients. (Each option alone: tests/test_architectures.py, every architecture.)"""
    model, state = model_state
    loss, grads = loss_and_grads(eqxtl.with_scan(model, False), state)
    loss_r, grads_r = loss_and_grads(eqxtl.with_remat(eqxtl.with_scan(model)), state)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    assert_trees_close(grads_r, grads)


def test_full_step_jaxpr_does_not_grow_with_depth():
    dots = {}
    for depth in (3, 6):
        config = dataclasses.replace(TINY_CLIP, num_hidden_layers=depth)
        model, state = classifier(config)
        for scan in (False, True):
            m = eqxtl.with_scan(model, scan)
            spec = eqxtl.everything(m)
            trainable, frozen = eqx.partition(m, spec)
            jaxpr = jax.make_jaxpr(grad_fn(spec))(trainable, frozen, state, batch())
            dots[depth, scan] = count_dots(jaxpr)
            if scan:  # forward and backward: one scan each over all but the last layer
                assert sorted(scans_in(jaxpr)) == [depth - 1, depth - 1]
    assert dots[3, True] == dots[6, True]
    assert dots[6, False] > dots[3, False] > dots[3, True]


def test_last_blocks_trains_those_layers_only(model_state):
    model, state = model_state
    scanned = eqxtl.with_scan(model)
    rules = ["head", *eqxtl.last_blocks(scanned, 2)]
    assert rules == ["head", *eqxtl.last_blocks(model, 2)]
    spec = eqxtl.trainable(scanned, *rules)
    # Frozen layers 0-1 run unrolled, forward only (nothing differentiates them); layer 2
    # alone: no scan.
    trainable, frozen = eqx.partition(scanned, spec)
    jaxpr = jax.make_jaxpr(grad_fn(spec))(trainable, frozen, state, batch())
    assert scans_in(jaxpr) == []
    # A step with layer-wise LR decay: the same update as unscanned, and only the head and
    # layers 2-3 move.
    frozen_rules = [r"backbone\.(embeddings|pre_layrnorm)", r"backbone\.encoder\.layers\.[01]"]
    groups = eqxtl.layerwise_groups(scanned, optax.adam, 1e-2, 0.5, frozen=frozen_rules)
    results = []
    for m in (eqxtl.with_scan(model, False), scanned):
        spec_m, optimizer = eqxtl.param_groups(m, groups)
        opt_state = optimizer.init(eqx.filter(m, spec_m))
        step = eqxtl.make_step(eqxtl.task_loss(), optimizer, spec_m)
        new, _, _, _ = step(m, state, opt_state, batch())
        results.append(new)
    assert_trees_close(results[1], results[0])
    before, after = (dict(eqxtl.state_dict(m)) for m in (model, results[1]))
    moved = {p for p in before if not np.array_equal(before[p], after[p])}
    prefixes = (
        "head.",
        "backbone.post_layernorm.",
        *(f"backbone.encoder.layers.{i}." for i in (2, 3)),
    )
    assert {p for p in before if p.startswith(prefixes)} == moved


def test_text_tower_scans_too():
    from eqxtl.models.clip_text import CLIPText, CLIPTextConfig

    config = CLIPTextConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=8,
        projection_dim=None,
        eos_token_id=99,
    )
    text = CLIPText(config, key=jax.random.key(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 99, (2, 8)), jnp.int32)
    scanned = eqxtl.with_scan(text)
    assert scanned.encoder.scan
    trainable, static = eqx.partition(scanned, eqx.is_inexact_array)

    def loss(t):
        return jnp.sum(eqx.combine(t, static).hidden_states(ids))

    # causal blocks scanned, forward and backward (a forward pass alone runs them unrolled)
    assert scans_in(jax.make_jaxpr(jax.grad(loss))(trainable)) == [3, 3]
    np.testing.assert_allclose(
        eqx.filter_jit(lambda m: m.hidden_states(ids))(scanned),
        eqx.filter_jit(lambda m: m.hidden_states(ids))(eqxtl.with_scan(text, False)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_lora_dropout_keys_go_with_their_layers(model_state):
    from eqxtl._util.pytree_paths import map_with_path

    model, state = model_state
    adapted = eqxtl.lora(model, r".*\.(q_proj|v_proj)", rank=4, dropout=0.5, key=jax.random.key(0))
    rng = np.random.default_rng(0)
    adapted = map_with_path(  # non-zero B: dropout changes the output
        lambda p, x: (
            jnp.asarray(0.05 * rng.normal(size=x.shape), x.dtype) if p.endswith("lora_b") else x
        ),
        adapted,
    )
    x = jnp.asarray(batch()["image"])

    def features(m, key):
        return eqx.filter_jit(lambda m: m.backbone(x, state, key=key)[0])(m)

    scanned = eqxtl.with_scan(adapted)
    key = jax.random.key(1)
    unrolled = eqxtl.with_scan(adapted, False)
    np.testing.assert_allclose(
        features(scanned, key), features(unrolled, key), rtol=1e-5, atol=1e-5
    )
    assert np.max(np.abs(features(scanned, key) - features(scanned, None))) > 1e-3


def test_unequal_blocks_and_an_int8_base(model_state):
    """Blocks that cannot share a scan run unrolled (a warning when none can), never a wrong
    result; an int8 base (``eqxtl.quantize``) scans and rematerialises with the unrolled
    gradients (the giant-backbone recipe: benchmarks/giant_lora.py)."""
    model, state = model_state
    key = jax.random.key(0)
    # Adapters on layers 0 and 2 only: no two neighbours of layers 0-2 share a structure.
    odd = eqxtl.lora(model, r".*layers\.[02]\.self_attn\.(q_proj|v_proj)", rank=4, key=key)
    spec = eqxtl.lora_spec(odd, "head")
    odd = eqxtl.quantize(odd, spec, "int8")
    # Adapters on every layer: layers 0-2 share one scan, forward and backward.
    every = eqxtl.lora(model, r".*\.(q_proj|v_proj)", rank=4, key=key)
    every = eqxtl.quantize(every, eqxtl.lora_spec(every, "head"), "int8")
    for adapted, scans in ((odd, []), (every, [3, 3])):
        scanned = eqxtl.with_remat(eqxtl.with_scan(adapted))
        spec = eqxtl.lora_spec(scanned, "head")
        trainable, frozen = eqx.partition(scanned, spec)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            jaxpr = jax.make_jaxpr(grad_fn(spec))(trainable, frozen, state, batch())
        assert sorted(scans_in(jaxpr)) == scans
        said = [str(w.message) for w in caught if "with_scan" in str(w.message)]
        assert bool(said) == (not scans), said
        if not scans:  # every block ran through the unrolled path
            continue
        unrolled = eqxtl.with_scan(adapted, False)
        loss, grads = loss_and_grads(unrolled, state, eqxtl.lora_spec(unrolled, "head"))
        loss_s, grads_s = loss_and_grads(scanned, state, spec)
        np.testing.assert_allclose(loss_s, loss, rtol=1e-6)
        assert_trees_close(grads_s, grads)


def test_the_scan_keeps_the_attention_output():
    """With 64+ tokens the CPU attention is chunked (``multihead_attention``); the scan's
    checkpoint saves its output, so the backward pass recomputes only the scores (one
    batched product per block, not the attention's two)."""
    config = dataclasses.replace(TINY_CLIP, patch_size=4)  # 8 x 8 patches + class token
    model, state = classifier(config)
    counts = {}
    for scan in (False, True):
        m = eqxtl.with_scan(model, scan)
        spec = eqxtl.everything(m)
        trainable, frozen = eqx.partition(m, spec)
        jaxpr = jax.make_jaxpr(grad_fn(spec))(trainable, frozen, state, batch())
        counts[scan] = count_dots(jaxpr, batched=True)
    per_block_unrolled = counts[False] / config.num_hidden_layers
    assert per_block_unrolled == 6  # forward 2, backward 4
    # scanned: one body for the last layer's forward + backward (6), one shared for the other
    # layers' forward (2) and their backward (4) plus the recomputed scores (1)
    assert counts[True] == 6 + 2 + 4 + 1


def test_blocks_that_nothing_differentiates_run_unrolled(model_state):
    """A forward pass alone saves nothing for a backward pass, so blocks that nothing
    differentiates run unrolled (no stacked copy of the weights per call): ``make_eval_step``
    and a head-only step have no scan in their programs, and give the metrics and update of
    the unrolled model."""
    model, state = model_state
    data = batch()
    loss_fn = eqxtl.task_loss()
    scanned = eqx.nn.inference_mode(eqxtl.with_scan(model, True))
    eval_step = eqxtl.make_eval_step()
    assert scans_in(eqx.filter_make_jaxpr(eval_step)(scanned, state, data)[0]) == []
    want = eqx.filter_jit(lambda m: loss_fn(m, state, data, None)[1][1])(
        eqxtl.with_scan(scanned, False)
    )
    assert_trees_close(eval_step(scanned, state, data), want)

    spec = eqxtl.trainable(scanned, "head")
    trainable, frozen = eqx.partition(scanned, spec)
    assert scans_in(jax.make_jaxpr(grad_fn(spec))(trainable, frozen, state, data)) == []
    # something trained below the blocks: they are differentiated, and scan
    spec = eqxtl.trainable(scanned, "head", r"backbone\.embeddings")
    trainable, frozen = eqx.partition(scanned, spec)
    assert scans_in(jax.make_jaxpr(grad_fn(spec))(trainable, frozen, state, data))


def test_by_default_small_carries_run_unrolled(model_state, monkeypatch):
    """The default (``None``) scans a run only when its carry holds at least
    ``SCAN_MIN_CARRY_PER_WEIGHT`` of a block's weight bytes: below, the stacked copy of the
    weights costs more than the scan saves. ``with_scan(model)`` scans at any size; the
    values do not depend on the choice."""
    from eqxtl.models import blockwise

    model, state = model_state

    def scans(m, data):
        spec = eqxtl.everything(m)
        trainable, frozen = eqx.partition(m, spec)
        return scans_in(jax.make_jaxpr(grad_fn(spec))(trainable, frozen, state, data))

    block = model.backbone.encoder.layers[0]
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(eqx.filter(block, eqx.is_array)))
    tokens = model.backbone.embeddings.position_embedding.weight.shape[0]
    width = model.backbone.embeddings.position_embedding.weight.shape[1]
    carry_bytes = tokens * width * 4  # per image
    threshold = blockwise.SCAN_MIN_CARRY_PER_WEIGHT * weight_bytes
    small = max(1, int(threshold // carry_bytes))  # the largest batch below the rule
    if small * carry_bytes >= threshold:
        small = 0
    big = small + 1
    assert small >= 1, "the tiny model must have a batch below the rule"
    assert scans(model, batch(size=small)) == []
    assert scans(model, batch(size=big))
    assert scans(eqxtl.with_scan(model), batch(size=small))
    assert_trees_close(
        loss_and_grads(model, state),
        loss_and_grads(eqxtl.with_scan(model), state),
    )
