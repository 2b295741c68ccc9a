"""Drop path (stochastic depth): the ``drop_path_rate`` field of every family that has one,
on the tiny configs of tests/_tiny.py.

- each block's rate is timm's (``torch.linspace(0, rate, depth)`` for its ViTs, the
  ``block_index / (num_blocks - 1)`` rule of its ResNet, one rate for every Mixer block,
  ``block_index / num_blocks`` for its EfficientNet, on the blocks with a residual branch);
- without a key (evaluation) the output is bit-identical to the rate-0 model's;
- with a key some examples' branches are dropped, each example's branch is either zero or
  scaled by ``1 / (1 - rate)``, and the mean over many keys of a block's output is its
  no-drop output;
- ``with_scan`` / ``with_remat`` give the same values, ``task_loss`` (what ``fit``'s step
  runs) and LoRA models drop paths, the rate is an override of ``from_pretrained`` and not
  part of the saved files, and a rate outside ``[0, 1)`` is refused naming the field.
"""

import dataclasses
import filecmp
import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import eqxtl
from eqxtl.io import checkpoint
from eqxtl.models import _clip_model, dinov2, efficientnet, mixer, resnet, vit
from eqxtl.models.blockwise import run_blocks
from eqxtl.models.layers import block_rates, drop_path
from eqxtl.models.registry import ARCHITECTURES
from eqxtl.training.step import task_loss
from tests._tiny import TINY_CONFIGS, random_tensors

FAMILIES = {"vit", "dinov2", "clip_vision", "siglip_vision", "mixer", "resnet", "efficientnet_lite"}
NAMES = [
    name
    for name, arch in ARCHITECTURES.items()
    if name in TINY_CONFIGS
    and "drop_path_rate" in {f.name for f in dataclasses.fields(arch.config_cls)}
]
RATE = 0.5
# Compiling dominates these tests: XLA's backend optimisations halve the compile time of
# the tiny programs and save nothing when they run.
FAST = {"xla_backend_optimization_level": 0}


def test_every_family_has_drop_path():
    assert FAMILIES <= set(NAMES)


@functools.cache  # models are immutable: the tests share them
def _model(name: str, rate: float):
    arch = ARCHITECTURES[name]
    config = dataclasses.replace(TINY_CONFIGS[name], drop_path_rate=rate)
    if name == "efficientnet_lite":  # 9 blocks, 3 with a residual branch (the tiny one: 0)
        config = dataclasses.replace(config, depth_coefficient=0.5)
    return checkpoint.fill(checkpoint.skeleton(arch, config), random_tensors(arch, config))


def _images(name: str, n: int = 8) -> jax.Array:
    config = TINY_CONFIGS[name]
    size = getattr(config, "image_size", 32)
    h, w = (size, size) if isinstance(size, int) else size
    return jax.random.normal(jax.random.key(1), (n, config.num_channels, h, w))


def _forward(model, state, x, key):
    keys = None if key is None else jax.random.split(key, x.shape[0])
    return eqxtl.batched(model)(x, state, keys)[0]


# --------------------------------------------------------------------------- the schedule


def _timm_rates(name: str, rate: float, config) -> list[float]:
    if name == "resnet":  # timm resnet.py make_blocks, over the blocks of all stages
        n = sum(config.depths)
        return [rate * i / (n - 1) for i in range(n)]
    if name == "mixer":  # timm mlp_mixer.py: drop_path=drop_path_rate for every block
        return [rate] * config.num_blocks
    if name == "efficientnet_lite":  # timm _efficientnet_builder.py: rate * index / count
        blocks = efficientnet._block_specs(config)
        residual = [s.stride == 1 and s.in_channels == s.out_channels for s in blocks]
        return [rate * i / len(blocks) for i, r in enumerate(residual) if r]  # only these add
    # timm vision_transformer.py: calculate_drop_path_rates(drop_path_rate, depth)
    return [x.item() for x in torch.linspace(0, rate, config.num_hidden_layers)]


@pytest.mark.parametrize("name", NAMES)
def test_rate_per_block_is_timms(name, monkeypatch):
    """The rates that reach the blocks' branches with a key (recorded at ``drop_path``
    while tracing), in order."""
    seen = []

    def record(x, rate, key, *, example_dims):
        seen.append((rate, key is not None))
        return drop_path(x, rate, key, example_dims=example_dims)

    for module in (vit, dinov2, _clip_model, mixer, resnet, efficientnet):
        monkeypatch.setattr(module, "drop_path", record)
    model, state = _model(name, 0.3)
    if ARCHITECTURES[name].supports_scan:  # unrolled: each block traced with its own rate
        model = eqxtl.with_scan(model, False)
    x = _images(name, 2)
    eqx.filter_eval_shape(lambda m: m(x, state, key=jax.random.key(0)), model)
    assert all(keyed for _, keyed in seen)
    branches = 1 if name in ("resnet", "efficientnet_lite") else 2  # transformer: 2
    rates = [rate for rate, _ in seen]
    for i in range(branches):
        assert rates[i::branches] == rates[::branches]  # both branches of a block: its rate
    want = _timm_rates(name, 0.3, model.config)
    assert rates[::branches] == pytest.approx(want, rel=1e-6, abs=1e-12)


def test_drop_path_draws_per_example():
    x = jnp.ones((64, 3, 5))
    y = drop_path(x, 0.5, jax.random.key(0), example_dims=2)
    per_example = y.reshape(64, -1)
    assert set(np.unique(np.asarray(per_example))) == {0.0, 2.0}  # zeroed or scaled by 1/keep
    assert bool(jnp.all(per_example == per_example[:, :1]))  # one draw per example
    assert drop_path(x, 0.5, None, example_dims=2) is x
    assert drop_path(x, 0.0, jax.random.key(0), example_dims=2) is x
    # no key or rate 0: the blocks get no rate at all (they run as without drop path)
    assert block_rates(0.5, 3, None) is None and block_rates(0.0, 3, jax.random.key(0)) is None


# --------------------------------------------------------------------------- the forward pass


def _jaxpr(model, state, x, key=None) -> str:
    return str(eqx.filter_make_jaxpr(lambda m: _forward(m, state, x, key))(model)[0])


def _grad_jaxpr(model, state, x, key) -> str:
    """The gradient's jaxpr: blocks scan only where they are differentiated."""
    loss = lambda m: jnp.sum(_forward(m, state, x, key))  # noqa: E731
    return str(eqx.filter_make_jaxpr(eqx.filter_grad(loss))(model)[0])


@pytest.mark.parametrize("name", NAMES)
def test_inference_unchanged_training_drops_scan_and_remat(name):
    """Without a key (evaluation) the model computes exactly what the rate-0 model does
    (the same jaxpr, so bit-identical outputs); with a key, some examples change.
    ``with_scan`` and ``with_remat`` trace with drop path inside their scan / checkpoints
    (their values: ``test_gradients_through_scanned_and_rematerialised_rates``). One
    compiled program per family: compiling dominates."""
    arch = ARCHITECTURES[name]
    plain, state = _model(name, 0.0)
    dropping, _ = _model(name, RATE)
    x, key = _images(name, 4), jax.random.key(3)
    want = _jaxpr(plain, state, x)
    assert _jaxpr(dropping, state, x) == want
    if arch.supports_scan:
        assert "scan" in _grad_jaxpr(eqxtl.with_scan(dropping), state, x, key)
    if arch.supports_remat:
        jaxpr = _jaxpr(eqxtl.with_remat(dropping), state, x, key)
        assert "checkpoint" in jaxpr or "remat" in jaxpr

    @functools.partial(eqx.filter_jit, compiler_options=FAST)
    def outputs(model, key):
        return _forward(model, state, x, None), _forward(model, state, x, key)

    reference, trained = outputs(dropping, key)
    changed = jnp.any(jnp.abs(trained - reference) > 1e-4, axis=-1)
    assert bool(jnp.any(changed)), f"{name}: no branch dropped"


def test_gradients_through_scanned_and_rematerialised_rates():
    """Blocks with different rates in one ``jax.lax.scan`` (the rates are scanned data),
    under remat: the values and gradients of the unrolled loop."""
    model, _ = _model("clip_vision", 0.0)
    layers = model.encoder.layers[:2]
    h = jax.random.normal(jax.random.key(5), (2, 5, model.config.hidden_size))
    keys, rates = list(jax.random.split(jax.random.key(6), 2)), [0.2, 0.6]

    @functools.partial(eqx.filter_jit, compiler_options=FAST)
    def value_and_grads(layers):
        def loss(layers, fast):
            out = run_blocks(
                _clip_model._run_layer, layers, h, keys, rates=rates, scan=fast, remat=fast
            )
            return jnp.sum(out**2)

        return [eqx.filter_value_and_grad(loss)(layers, fast) for fast in (False, True)]

    (want, want_grads), (got, grads) = value_and_grads(layers)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    scale = max(float(jnp.max(jnp.abs(w))) for w in jax.tree.leaves(want_grads))
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * scale)  # float32 rounding


def _at(tree, path: str):
    for part in path.split("."):
        tree = tree[int(part)] if part.isdigit() else getattr(tree, part)
    return tree


# One block of each family, and the last layer of each of its residual branches: with that
# layer zeroed the block is ``base + drop(branch)`` where ``base`` is the input (transformer
# blocks) or 0 (a ResNet block whose projection shortcut is zeroed: relu(drop(h)) equals
# drop(relu(h)), since drop scales by a factor >= 0). SigLIP's blocks are CLIP's.
BLOCKS = {
    "vit": ("encoder.layer.0", ("attention.output.dense", "output.dense")),
    "dinov2": ("encoder.layer.0", ("layer_scale1", "layer_scale2")),
    "clip_vision": ("encoder.layers.0", ("self_attn.out_proj", "mlp.fc2")),
    "mixer": ("blocks.0", ("mlp_tokens.fc2", "mlp_channels.fc2")),
    "resnet": ("encoder.stages.1.layers.0", ("shortcut.normalization",)),
}


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_expectation_preserved(name):
    """``K`` keys: each example's output is ``base`` (dropped) or ``base + branch / keep``
    (kept), and the mean is the no-drop output, for each branch of a block. Tolerance: the
    mean's branch factor is ``p / keep`` with ``p`` the kept fraction of ``K``
    Bernoulli(keep) draws, whose standard deviation is ``sqrt(rate / ((1 - rate) K))``;
    allowed: 5 of them (a false alarm ~1e-6 per example), times ``|branch|``, plus float32
    rounding."""
    model, state = _model(name, 0.0)
    where, zero = BLOCKS[name]
    blocks = [
        eqx.tree_at(
            lambda b, path=path: _at(b, path),
            _at(model, where),
            replace_fn=lambda m: jax.tree.map(
                lambda a: jnp.zeros_like(a) if eqx.is_array(a) else a, m
            ),
        )
        for path in zero
    ]
    if name == "resnet":
        x = jax.random.normal(jax.random.key(5), (2, 8, 8, 8))
        leaves, treedef = jax.tree.flatten(state)

        def call(block, key, rate):  # a fresh state each call (Equinox refuses reuse)
            return block(x, jax.tree.unflatten(treedef, leaves), key, rate)[0]

        base = jnp.zeros(())
    else:
        tokens = model.config.num_patches if name == "mixer" else 5
        x = jax.random.normal(jax.random.key(5), (2, tokens, model.config.hidden_size))

        def call(block, key, rate):
            return block(x, key=key, drop_rate=rate)

        base = x
    k, keep = 2000, 1 - RATE
    keys = jax.random.split(jax.random.key(6), k)

    @functools.partial(eqx.filter_jit, compiler_options=FAST)
    def run(blocks):
        draws = [jax.vmap(lambda kk, b=b: call(b, kk, RATE))(keys) for b in blocks]
        return [(call(b, None, None), d) for b, d in zip(blocks, draws, strict=True)]

    sigma = math.sqrt(RATE / ((1 - RATE) * k))
    for want, outs in run(blocks):
        branch = want - base
        axes = tuple(range(2, outs.ndim))  # one verdict per (key, example)
        dropped = jnp.all(jnp.isclose(outs, base, rtol=1e-5, atol=1e-5), axis=axes)
        kept = jnp.all(jnp.isclose(outs, base + branch / keep, rtol=1e-5, atol=1e-5), axis=axes)
        assert bool(jnp.all(dropped ^ kept)), f"{name}: an output neither dropped nor kept"
        error = jnp.abs(jnp.mean(outs, axis=0) - want)
        assert bool(jnp.all(error <= 5 * sigma * jnp.abs(branch) + 1e-5)), float(jnp.max(error))


def test_train_loss_drops_paths_with_lora(monkeypatch):
    """``task_loss`` (the loss ``fit``'s step differentiates) hands its key to every block's
    branches through the Classifier, LoRA adapters included (recorded at ``drop_path``
    while tracing); the evaluation call (no key) computes what the rate-0 model does."""

    def classifier(rate):
        backbone, state = _model("clip_vision", rate)
        backbone = eqxtl.with_scan(backbone, False)  # each block traced with its own rate
        model = eqxtl.Classifier(backbone, 3, key=jax.random.key(0))
        return eqxtl.lora(model, r".*\.(q_proj|v_proj)", rank=2, key=jax.random.key(1)), state

    (model, state), (plain, _) = classifier(RATE), classifier(0.0)
    batch = {"image": _images("clip_vision", 4), "label": jnp.arange(4) % 3}
    loss = task_loss()
    evaluated = eqx.filter_make_jaxpr(lambda m: loss(m, state, batch, None)[0])
    assert str(evaluated(model)[0]) == str(evaluated(plain)[0])
    seen = []

    def record(x, rate, key, *, example_dims):
        seen.append((rate, key is not None))
        return drop_path(x, rate, key, example_dims=example_dims)

    monkeypatch.setattr(_clip_model, "drop_path", record)
    eqx.filter_make_jaxpr(lambda m: loss(m, state, batch, jax.random.key(2))[0])(model)
    want = _timm_rates("clip_vision", RATE, model.backbone.config)
    assert seen == [(rate, True) for rate in want for _ in range(2)]


# --------------------------------------------------------------------------- config and files


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, math.nan, True, "0.1"])
@pytest.mark.parametrize("name", NAMES)
def test_rate_outside_unit_interval_refused(name, bad):
    with pytest.raises(ValueError, match="drop_path_rate"):
        dataclasses.replace(TINY_CONFIGS[name], drop_path_rate=bad)


@pytest.mark.parametrize("name", NAMES)
def test_rate_is_an_override_and_not_saved(name, tmp_path):
    plain, state = _model(name, 0.0)
    eqxtl.save_pretrained(plain, state, tmp_path / "a")
    # the architecture's other choices (DINOv2's pooling) are arguments too
    choices = {f: getattr(plain.config, f) for f in ARCHITECTURES[name].choices}
    choices["drop_path_rate"] = 0.1
    loaded, loaded_state = eqxtl.from_pretrained(tmp_path / "a", **choices)
    assert loaded.config == dataclasses.replace(plain.config, drop_path_rate=0.1)
    eqxtl.save_pretrained(loaded, loaded_state, tmp_path / "b")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", files, shallow=False)[0] == files
    del choices["drop_path_rate"]
    again, _ = eqxtl.from_pretrained(tmp_path / "b", **choices)
    assert again.config == plain.config  # the default rate, 0
    with pytest.raises(eqxtl.CheckpointError, match="drop_path_rate"):
        eqxtl.from_pretrained(tmp_path / "a", drop_path_rate=1.0)
