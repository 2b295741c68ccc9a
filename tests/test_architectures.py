"""Generic checks of every registered architecture (``eqxtl.ARCHITECTURES``), on the tiny
configs of tests/_tiny.py (``TINY_CONFIGS``, keyed by ``Architecture.name``; the build,
layout and LoRA checks also on the second configs of ``TINY_VARIANTS``):

- every architecture has a tiny config, and it builds;
- each layout's key map saves what it loads, and ``save_pretrained`` / ``from_pretrained``
  round trips are bit-identical (or the layout refuses to be written, with a clear error);
- ``eqxtl.batched`` (one call on the whole batch) equals ``jax.vmap`` over the examples:
  loss, outputs, updated state and gradients (BatchNorm models in training mode, and their
  inference-mode outputs);
- ``blocks`` / ``last_blocks`` / ``layer_depths`` / ``layerwise_groups`` / ``param_groups``;
- ``with_remat`` and ``with_scan``: the same values and gradients, or an ``EqxtlError``
  naming the option where the architecture does not support it;
- LoRA on the architecture's ``linear_types``: unchanged at init, merged == unmerged;
- ``preprocessing_for``.

Parity with the reference implementations (transformers, timm, open_clip, big_vision)
stays in the per-family modules. Compile cost dominates on CPU: each architecture's model
is built once per module, and each compiled computation (forward + gradient of one path)
runs once and is shared by the tests that compare against it.
"""

import filecmp
import re
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqxtl
from eqxtl._util.pytree_paths import map_with_path
from eqxtl.io import checkpoint
from eqxtl.models import blockwise
from eqxtl.models.registry import ARCHITECTURES, architecture_of
from eqxtl.tuning.adapters.inject import adapter_targets, all_layers
from eqxtl.tuning.filters import _zip_spec
from tests._tiny import TINY_CONFIGS, TINY_VARIANTS, tiny_architecture, tiny_config

SWITCHES = {"remat": eqxtl.with_remat, "scan": eqxtl.with_scan}


def supports(arch, option: str) -> bool:
    """Whether ``arch`` states that it supports ``option`` (``"remat"`` / ``"scan"``)."""
    return getattr(arch, f"supports_{option}")


def _named(towers: str) -> list[str]:
    return [n for n, a in ARCHITECTURES.items() if a.towers == towers and n in TINY_CONFIGS]


NAMES = _named("vision")  # backbones: (x, state) -> (features, state), under a Classifier
TWO_TOWERS = _named("both")  # image-text models: (images, input_ids) -> logits
# second tiny configs of a structure (DINOv2's SwiGLU): build, layouts and LoRA only
VARIANTS = [n for n, (arch, _) in TINY_VARIANTS.items() if ARCHITECTURES[arch].towers == "vision"]
LAYOUTS = [(n, lay.name) for n in NAMES + VARIANTS for lay in tiny_config(n)[0].layouts]
TWO_TOWER_LAYOUTS = [(n, lay.name) for n in TWO_TOWERS for lay in ARCHITECTURES[n].layouts]
NUM_CLASSES = 3
BATCH = 3
# batched vs vmap: max |Δ| relative to each leaf's largest value; BatchNorm models in training
# mode reduce the batch statistics in another order, and that rounding reaches every gradient
GRAD_TOL = 1e-4
GRAD_TOL_BATCHNORM = 1e-3
SAME_TOL = 1e-5  # remat / scan / merged LoRA: the same computation, reordered at most


def image_side(config) -> tuple[int, int] | None:
    size = getattr(config, "image_size", None)
    if size is None:
        return None
    return (size, size) if isinstance(size, int) else tuple(size)


def has_state(state) -> bool:
    """Whether the model keeps state (BatchNorm running statistics)."""
    return bool(jax.tree.leaves(state))


def clone(state):  # eqx.nn.State is single-use: each call gets its own
    return jax.tree.unflatten(*reversed(jax.tree.flatten(state)))


def _loss(model, state, x, labels, how):
    if how == "vmap":
        fn = lambda xi: model(xi, state)  # noqa: E731
        out, new_state = jax.vmap(fn, axis_name="batch", out_axes=(0, None))(x)
    else:
        out, new_state = eqxtl.batched(model)(x, state)
    loss = -jnp.mean(jax.nn.log_softmax(out)[jnp.arange(x.shape[0]), labels])
    return loss, (out, new_state)


# one compiled forward + gradient per (model structure, path), shared by every test
_value_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(_loss, has_aux=True))


@eqx.filter_jit
def _forward(model, state, x, how="batched"):
    return _loss(model, state, x, jnp.zeros(x.shape[0], int), how)[1][0]


class Lab:
    """Each architecture's tiny Classifier, input batch and gradient results, built once."""

    def __init__(self):
        self._models, self._results = {}, {}

    def model(self, name):
        """``(arch, config, classifier, state, x)``, in inference mode."""
        if name not in self._models:
            arch, config = tiny_config(name)
            backbone, state = tiny_architecture(name, seed=1)
            model = eqxtl.Classifier(backbone, NUM_CLASSES, key=jax.random.key(0))
            h, w = image_side(config) or (32, 32)
            channels = getattr(config, "num_channels", 3)
            x = np.random.default_rng(2).normal(size=(BATCH, channels, h, w))
            self._models[name] = arch, config, model, state, jnp.asarray(x, jnp.float32)
        return self._models[name]

    def result(self, name, how="batched", option=None):
        """``(loss, (outputs, new state), gradients)`` of the classification loss; models
        with state (BatchNorm) in training mode."""
        key = name, how, option
        if key not in self._results:
            arch, _, model, state, x = self.model(name)
            model = eqx.nn.inference_mode(model, not has_state(state))
            if option is not None:
                model = SWITCHES[option](model)
            elif supports(arch, "scan"):  # the reference: one unrolled copy per block
                model = eqxtl.with_scan(model, False)
            labels = jnp.arange(BATCH) % NUM_CLASSES
            (loss, aux), grads = _value_and_grad(model, clone(state), x, labels, how)
            self._results[key] = loss, aux, grads
        return self._results[key]


@pytest.fixture(scope="module")
def lab():
    return Lab()


def trained(model, spec) -> set[str]:
    return {path for path, _, on in _zip_spec(model, spec) if on}


def assert_trees_close(got, want, tol, what):
    """Leaf by leaf: ``max |got - want| <= tol * max |want|``, with ``max |want|`` at least
    1e-2 of the whole tree's (a gradient that is zero in exact arithmetic, e.g. of an
    attention key bias, is float noise either way)."""
    got_leaves = jax.tree.leaves_with_path(eqx.filter(got, eqx.is_array))
    want_leaves = [
        np.asarray(b, np.float64) for b in jax.tree.leaves(eqx.filter(want, eqx.is_array))
    ]
    assert len(got_leaves) == len(want_leaves), what
    floor = 1e-2 * max((float(np.max(np.abs(b), initial=0.0)) for b in want_leaves), default=0)
    for (path, a), b in zip(got_leaves, want_leaves, strict=True):
        a = np.asarray(a, np.float64)
        assert a.shape == b.shape, (what, jax.tree_util.keystr(path))
        err = float(np.max(np.abs(a - b), initial=0.0))
        scale = max(float(np.max(np.abs(b), initial=0.0)), floor)
        assert err <= tol * scale, f"{what} {jax.tree_util.keystr(path)}: {err:.2e} / {scale:.2e}"


def flags(model, option: str) -> list[bool]:
    """The ``option`` flag of every module that has one."""
    found = jax.tree.leaves(model, is_leaf=lambda x: hasattr(x, option))
    return [getattr(m, option) for m in found if hasattr(m, option)]


# --------------------------------------------------------------------------- registry


def test_every_architecture_has_a_tiny_config():
    missing = sorted(set(ARCHITECTURES) - set(TINY_CONFIGS))
    assert not missing, (
        f"architectures without a tiny config in tests/_tiny.py TINY_CONFIGS: {missing} "
        "(add one: every generic check runs on it)"
    )
    stale = sorted(set(TINY_CONFIGS) - set(ARCHITECTURES))
    assert not stale, f"TINY_CONFIGS names no registered architecture: {stale}"
    for name, config in TINY_CONFIGS.items():
        assert isinstance(config, ARCHITECTURES[name].config_cls), name


@pytest.mark.parametrize("name", NAMES + VARIANTS)
def test_tiny_config_builds(lab, name):
    arch, config, model, state, x = lab.model(name)
    assert architecture_of(model.backbone) is arch
    assert model.backbone.config == config
    features = eqx.filter_eval_shape(lambda m: eqxtl.batched(m)(x, state)[0], model.backbone)
    assert features.shape == (BATCH, arch.feature_dim(config))
    # the shapes alone tell the config back (what a bare weights file relies on), at least
    # in every field the weights hold
    shapes = {k: tuple(v.shape) for k, v in eqxtl.state_dict(model.backbone, state).items()}
    inferred = arch.infer_config(shapes)
    rebuilt = checkpoint.array_shapes(checkpoint.skeleton(arch, inferred))
    assert {k: tuple(v.shape) for k, v in rebuilt.items()} == shapes
    assert arch.detect(shapes)


# --------------------------------------------------------------------------- saving


def _canonical(model, state, with_head: bool) -> dict[str, np.ndarray]:
    out = {k: np.asarray(v) for k, v in eqxtl.state_dict(model.backbone, state).items()}
    if with_head:
        out.update({f"head.{k}": np.asarray(v) for k, v in eqxtl.state_dict(model.head).items()})
    return out


def _identical(got: dict, want: dict, what: str) -> bool:
    """Whether two tensor dicts are bit-identical (the same keys asserted)."""
    assert got.keys() == want.keys(), what
    return all(np.array_equal(np.asarray(got[k]), np.asarray(want[k])) for k in want)


@pytest.mark.filterwarnings("ignore:.*is not stored in the weights")
@pytest.mark.parametrize("name, layout", LAYOUTS)
def test_layout_saves_what_it_loads(lab, name, layout, tmp_path):
    """The layout's key map, with and without a head: ``load(save(x)) == x`` bit for bit
    (or, for a layout that rewrites tensors on save, e.g. DINOv2's timm layout folding the
    class position into ``cls_token``: ``save(load(f)) == f`` and the same outputs). The
    default layout writes every architecture; another may refuse, with a CheckpointError
    naming it. Then through the files: ``save_pretrained`` -> ``from_pretrained`` of a
    Classifier, the layout recognised from the files alone."""
    arch, config, model, state, x = lab.model(name)
    lay = arch.layout(layout)
    writes = {}
    for with_head in (False, True):
        tensors = _canonical(model, state, with_head)
        try:
            saved = lay.keys.save(tensors, with_head)
        except (KeyError, ValueError):
            assert lay is not arch.layouts[0], f"the default layout must write {name}"
            writes[with_head] = False
            out = tmp_path / f"refused{with_head}"
            with pytest.raises(eqxtl.CheckpointError, match=layout):
                eqxtl.save_pretrained(
                    model if with_head else model.backbone, state, out, layout=layout
                )
            assert not out.exists()
            continue
        writes[with_head] = True
        plan = (lay.variant(saved) or lay.keys).plan(saved)
        assert plan.unexplained == (), (layout, plan.unexplained)
        loaded = {k: r.read(saved) for k, r in plan.recipes.items()}
        if not _identical(loaded, tensors, layout):
            assert _identical(lay.keys.save(loaded, with_head), saved, f"{layout} fixed point")
        assert arch.detect({k: v.shape for k, v in saved.items()})

    if not writes[True]:
        return  # checked above: the layout refuses the Classifier
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eqxtl.save_pretrained(model, state, tmp_path / "a", layout=layout)
    # a folder without a config reads like a pretrained checkpoint: the user is told
    configless = not list((tmp_path / "a").glob("*.json"))
    warned = [w for w in caught if "keep_head=True" in str(w.message)]
    assert bool(warned) == configless, (layout, [str(w.message) for w in caught])
    try:  # without the user's choices: a model that runs, or refused at load (never later)
        bare, bare_state = eqxtl.from_pretrained(tmp_path / "a", keep_head=True)
    except eqxtl.CheckpointError as e:
        assert "head" in str(e)
    else:
        eqx.filter_eval_shape(lambda m: eqxtl.batched(m)(x, bare_state)[0], bare)
    # the user's choices (e.g. DINOv2's pooling) are arguments where a layout cannot state them
    choices = {field: getattr(config, field) for field in arch.choices}
    again, again_state = eqxtl.from_pretrained(tmp_path / "a", keep_head=True, **choices)
    assert architecture_of(again.backbone) is arch
    if not _identical(_canonical(again, again_state, True), _canonical(model, state, True), layout):
        want = _forward(model, state, x)
        assert_trees_close(_forward(again, again_state, x), want, SAME_TOL, layout)
        eqxtl.save_pretrained(again, again_state, tmp_path / "b", layout=layout)
        files = sorted(p.name for p in (tmp_path / "a").iterdir())
        assert filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", files, shallow=False)[0] == files
    if lay is arch.layouts[0]:  # the library's own files state the whole config
        again, _ = eqxtl.from_pretrained(tmp_path / "a", keep_head=True)
        assert again.backbone.config == config
        assert eqxtl.preprocessing_for(again) == eqxtl.preprocessing_for(model)


# --------------------------------------------------------------------------- batching


@pytest.mark.parametrize("name", NAMES)
def test_batched_equals_vmap(lab, name):
    """``eqxtl.batched`` against ``jax.vmap`` over the examples: loss, outputs, updated state
    and every gradient (BatchNorm models in training mode: statistics over the batch; and
    their inference-mode outputs)."""
    _, _, model, state, x = lab.model(name)
    tol = GRAD_TOL_BATCHNORM if has_state(state) else GRAD_TOL
    loss, (out, new_state), grads = lab.result(name, "batched")
    want_loss, (want_out, want_state), want_grads = lab.result(name, "vmap")
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, err_msg=name)
    assert_trees_close(out, want_out, tol, f"{name} outputs")
    assert_trees_close(new_state, want_state, tol, f"{name} state")
    assert_trees_close(grads, want_grads, tol, f"{name} gradients")
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))
    if has_state(state):  # the running statistics moved
        before, after = jax.tree.leaves(state), jax.tree.leaves(new_state)
        assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
        got, want = (_forward(model, state, x, how) for how in ("batched", "vmap"))
        assert_trees_close(got, want, tol, f"{name} inference-mode outputs")


# --------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("name", NAMES)
def test_blocks_last_blocks_and_layerwise_groups(lab, name):
    arch, _, model, _, _ = lab.model(name)
    check_blocks(model, arch, prefix="backbone.", head=("head",))


def check_blocks(model, arch, *, prefix: str, head: tuple[str, ...]):
    """``blocks`` in forward order, ``last_blocks(model, 1)`` trains the last one (and
    ``head``), ``layer_depths`` and the rates of ``layerwise_groups``."""
    blocks = eqxtl.blocks(model)
    assert len(blocks) >= 2 and len(set(blocks)) == len(blocks)
    assert all(re.fullmatch(rf"{re.escape(prefix)}(?:{arch.blocks})", b) for b in blocks), blocks
    paths = eqxtl.paths(model)

    def block_index(path):
        return next((i for i, b in enumerate(blocks) if path.startswith(b + ".")), None)

    # blocks in forward order = the order their leaves appear; nothing between them
    inside = [block_index(p) for p in paths]
    first = next(i for i, b in enumerate(inside) if b is not None)
    last = max(i for i, b in enumerate(inside) if b is not None)
    assert inside[first : last + 1] == sorted(inside[first : last + 1])
    assert None not in inside[first : last + 1]

    rules = eqxtl.last_blocks(model, 1)
    assert rules == [re.escape(blocks[-1])]
    spec = eqxtl.trainable(model, *head, *rules)
    starts = tuple(f"{h}." for h in head) + (blocks[-1] + ".",)
    assert trained(model, spec) == {p for p in paths if p.startswith(starts)}

    depth_of, n = eqxtl.layer_depths(model)
    assert n == len(blocks)
    for i, path in enumerate(paths):
        b = inside[i]
        want = b + 1 if b is not None else (0 if i < first else n + 1)
        assert depth_of(path) == want, path

    # layer-wise decay: an SGD step of gradient 1 moves each leaf by its group's rate
    groups = eqxtl.layerwise_groups(model, optax.sgd, 1.0, 0.5)
    assert len(groups) == n + 2
    spec, optimizer = eqxtl.param_groups(model, groups)
    params = eqx.filter(model, spec)
    update = jax.jit(lambda p: optimizer.update(jax.tree.map(jnp.ones_like, p), optimizer.init(p)))
    updates = jax.tree.leaves(update(params)[0])
    on = [p for p, _, flag in _zip_spec(model, spec) if flag]
    assert len(on) == len(updates)
    for path, u in zip(on, updates, strict=True):
        np.testing.assert_allclose(u, -(0.5 ** (n + 1 - depth_of(path))), err_msg=path)


# --------------------------------------------------------------------------- remat, scan


@pytest.mark.parametrize("option", ["remat", "scan"])
@pytest.mark.parametrize("name", NAMES)
def test_remat_and_scan_change_nothing_or_are_refused(lab, name, option, monkeypatch):
    """Values, outputs, state and gradients as the plain model's (BatchNorm models in
    training mode); the same pytree, arrays shared; the option reaches the compiled code.
    An architecture without the option: an EqxtlError naming it."""
    arch, _, model, state, x = lab.model(name)
    switch = SWITCHES[option]
    if not supports(arch, option):
        with pytest.raises(eqxtl.EqxtlError, match=option):
            switch(model)
        return
    on = switch(model)
    assert eqxtl.paths(on) == eqxtl.paths(model)
    arrays = [jax.tree.leaves(eqx.filter(m, eqx.is_array)) for m in (model, on)]
    assert all(a is b for a, b in zip(*arrays, strict=True))
    assert all(flags(on, option)) and not any(flags(switch(on, False), option))
    assert flags(model, option) and not any(flags(model, option))  # the original untouched
    # differentiated: a forward pass alone runs its blocks unrolled (nothing to save)
    gradient = eqx.filter_grad(
        lambda m: sum(jnp.sum(y) for y in jax.tree.leaves(eqxtl.batched(m)(x, state)[0]))
    )
    jaxpr = str(eqx.filter_make_jaxpr(gradient)(on)[0])
    assert ("checkpoint" in jaxpr or "remat" in jaxpr) if option == "remat" else "scan" in jaxpr
    if option == "scan":  # scanned by default: ``None`` (quiet) in every flag, a scan traced
        assert all(flag is None for flag in flags(model, option))
        # (at any size: the tiny models' carries are below the default's size rule)
        monkeypatch.setattr(blockwise, "SCAN_MIN_CARRY_PER_WEIGHT", 0.0)
        assert jaxpr == str(eqx.filter_make_jaxpr(gradient)(model)[0])

    loss, (out, new_state), grads = lab.result(name, "batched", option)
    want_loss, (want_out, want_state), want_grads = lab.result(name, "batched")
    what = f"{name} {option}"
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6, err_msg=what)
    assert_trees_close(out, want_out, SAME_TOL, f"{what} outputs")
    assert_trees_close(new_state, want_state, SAME_TOL, f"{what} state")
    assert_trees_close(grads, want_grads, SAME_TOL, f"{what} gradients")


# --------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("name", NAMES + VARIANTS)
def test_lora_on_the_linear_types(lab, name):
    """LoRA on every layer of the architecture's ``linear_types``: outputs unchanged at init
    (B = 0); with B perturbed, the merged plain model gives the adapted outputs."""
    arch, _, model, state, x = lab.model(name)
    targets = set(adapter_targets(model.backbone))
    layers = [layer for p, layer in all_layers(model.backbone) if p in targets]
    types = [t for t in arch.linear_types if any(isinstance(layer, t) for layer in layers)]
    adapted = eqxtl.lora(model, types, rank=2, key=jax.random.key(0))
    paths = eqxtl.paths(adapted)
    adapted_layers = {p.removesuffix(".lora_a") for p in paths if p.endswith(".lora_a")}
    # the linear types cover every layer LoRA can adapt in the backbone
    assert {f"backbone.{p}" for p in targets} <= adapted_layers
    assert adapted_layers - {f"backbone.{p}" for p in targets} <= {"head"}
    assert trained(adapted, eqxtl.lora_spec(adapted)) == {p for p in paths if ".lora_" in p}

    plain = _forward(model, state, x)  # the adapted forward adds B (A x) = 0: rounding only
    assert_trees_close(_forward(adapted, state, x), plain, 1e-6, f"{name} LoRA at init")

    rng = np.random.default_rng(3)  # in numpy: eager jnp ops compile once per shape
    adapted = map_with_path(
        lambda p, v: (
            jnp.asarray(0.1 * rng.normal(size=v.shape), v.dtype) if p.endswith("lora_b") else v
        ),
        adapted,
    )
    want = _forward(adapted, state, x)
    assert float(jnp.max(jnp.abs(want - plain))) > 1e-3 * float(jnp.max(jnp.abs(plain)))
    merged = eqxtl.merge_lora(adapted)
    assert jax.tree.structure(merged) == jax.tree.structure(model)  # a plain model again
    assert_trees_close(_forward(merged, state, x), want, SAME_TOL, f"{name} merged")


# --------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("name", NAMES)
def test_preprocessing_for(lab, name):
    arch, config, model, _, _ = lab.model(name)
    pre = eqxtl.preprocessing_for(model)
    assert pre == eqxtl.preprocessing_for(model.backbone) == arch.preprocessing(config)
    side = image_side(config)
    if side is not None:
        assert pre.crop == side[0]
    assert pre.resize >= pre.crop


# --------------------------------------------------------------------------- two towers
# Image-text models (``towers == "both"``): the same checks on the whole model, whose call is
# ``(images (B, C, H, W), input_ids (T, n)) -> logits (B, T)``.


@pytest.fixture(scope="module")
def two_towers():
    """``{name: (arch, config, model, images, input_ids)}``, built once."""
    out = {}
    for name in TWO_TOWERS:
        arch, config = ARCHITECTURES[name], TINY_CONFIGS[name]
        model, _ = tiny_architecture(name, seed=1)
        h, w = image_side(config.vision_config)
        rng = np.random.default_rng(2)
        images = jnp.asarray(rng.normal(size=(BATCH, 3, h, w)), jnp.float32)
        text = config.text_config
        ids = rng.integers(3, text.vocab_size - 2, size=(2, text.max_position_embeddings))
        ids[:, 0], ids[:, -1] = text.bos_token_id, text.eos_token_id
        out[name] = arch, config, model, images, jnp.asarray(ids, jnp.int32)
    return out


@eqx.filter_jit
def _logits_and_grads(model, images, ids):
    def loss(m):
        logits = m(images, ids)
        return jnp.mean(jax.nn.log_softmax(logits)[:, 0]), logits

    return eqx.filter_value_and_grad(loss, has_aux=True)(model)


@pytest.mark.parametrize("name", TWO_TOWERS)
def test_two_towers_build(two_towers, name):
    arch, config, model, images, ids = two_towers[name]
    assert architecture_of(model) is arch and model.config == config
    logits = eqx.filter_eval_shape(lambda m: m(images, ids), model)
    assert logits.shape == (BATCH, ids.shape[0])
    assert arch.feature_dim(config) == config.projection_dim
    shapes = {k: tuple(v.shape) for k, v in eqxtl.state_dict(model).items()}
    rebuilt = checkpoint.array_shapes(checkpoint.skeleton(arch, arch.infer_config(shapes)))
    assert {k: tuple(v.shape) for k, v in rebuilt.items()} == shapes
    assert eqxtl.preprocessing_for(model) == arch.preprocessing(config)
    assert eqxtl.preprocessing_for(model).crop == image_side(config.vision_config)[0]


@pytest.mark.parametrize("name, layout", TWO_TOWER_LAYOUTS)
def test_two_towers_layout_saves_what_it_loads(two_towers, name, layout, tmp_path):
    """The key map gives back what it saved, bit for bit; ``save_pretrained`` ->
    ``from_pretrained(towers="both")`` gives the same weights and config back."""
    arch, config, model, _, _ = two_towers[name]
    lay = arch.layout(layout)
    tensors = {k: np.asarray(v) for k, v in eqxtl.state_dict(model).items()}
    saved = lay.keys.save(tensors, False)
    plan = lay.keys.plan(saved)
    assert plan.unexplained == (), (layout, plan.unexplained)
    assert _identical({k: r.read(saved) for k, r in plan.recipes.items()}, tensors, layout)
    eqxtl.save_pretrained(model, eqx.nn.State(model), tmp_path / "a", layout=layout)
    again, _ = eqxtl.from_pretrained(tmp_path / "a", towers="both")
    assert architecture_of(again) is arch
    got = {k: np.asarray(v) for k, v in eqxtl.state_dict(again).items()}
    assert _identical(got, tensors, layout)
    if lay is arch.layouts[0]:  # the library's own files state the whole config
        assert again.config == config


@pytest.mark.parametrize("name", TWO_TOWERS)
def test_two_towers_blocks_and_layerwise_groups(two_towers, name):
    """The decay counts the image tower's blocks; the text tower's trained layers would
    train at the head's rate, and a warning says so unless they are frozen."""
    arch, _, model, _, _ = two_towers[name]
    with pytest.warns(UserWarning, match=r"text_model\.encoder\.layers\.0\..*another tower"):
        check_blocks(model, arch, prefix="", head=())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eqxtl.layerwise_groups(model, optax.sgd, 1.0, 0.5, frozen=["text_model"])


@pytest.mark.parametrize("option", ["remat", "scan"])
@pytest.mark.parametrize("name", TWO_TOWERS)
def test_two_towers_remat_and_scan(two_towers, name, option):
    arch, _, model, images, ids = two_towers[name]
    switch = SWITCHES[option]
    if not supports(arch, option):
        with pytest.raises(eqxtl.EqxtlError, match=option):
            switch(model)
        return
    on = switch(model)
    assert eqxtl.paths(on) == eqxtl.paths(model)
    assert all(flags(on, option)) and not any(flags(model, option))
    if option == "scan":  # scanned by default: the reference unrolls
        model = switch(model, False)
    (loss, logits), grads = _logits_and_grads(model, images, ids)
    (loss_on, logits_on), grads_on = _logits_and_grads(on, images, ids)
    np.testing.assert_allclose(loss_on, loss, rtol=1e-6)
    assert_trees_close(logits_on, logits, SAME_TOL, f"{name} {option} logits")
    assert_trees_close(grads_on, grads, SAME_TOL, f"{name} {option} gradients")


@pytest.mark.parametrize("name", TWO_TOWERS)
def test_two_towers_lora(two_towers, name):
    """LoRA on the architecture's ``lora_types``, in both towers: logits unchanged at init;
    with B perturbed, the merged plain model gives the adapted logits."""
    arch, _, model, images, ids = two_towers[name]
    forward = eqx.filter_jit(lambda m: m(images, ids))
    adapted = eqxtl.lora(model, arch.lora_types, rank=2, key=jax.random.key(0))
    paths = eqxtl.paths(adapted)
    towers = {p.split(".")[0] for p in paths if p.endswith(".lora_a")}
    assert {"vision_model", "text_model"} <= towers
    plain = forward(model)
    assert_trees_close(forward(adapted), plain, 1e-6, f"{name} LoRA at init")
    rng = np.random.default_rng(3)
    adapted = map_with_path(
        lambda p, v: (
            jnp.asarray(0.1 * rng.normal(size=v.shape), v.dtype) if p.endswith("lora_b") else v
        ),
        adapted,
    )
    want = forward(adapted)
    assert float(jnp.max(jnp.abs(want - plain))) > 1e-3 * float(jnp.max(jnp.abs(plain)))
    merged = eqxtl.merge_lora(adapted)
    assert jax.tree.structure(merged) == jax.tree.structure(model)
    assert_trees_close(forward(merged), want, SAME_TOL, f"{name} merged")
