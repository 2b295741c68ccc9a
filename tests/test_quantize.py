"""eqxtl.quantize: frozen weights stored as int8 (one scale per output channel), NF4 (4-bit
NormalFloat, one absmax per 64 weights) or bfloat16; LoRA on an int8 or NF4 base; saving,
merging, remat and scan; bad input; the int8 forward of the real EfficientNet-Lite0 on
photographs."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqxtl
from eqxtl._util.pytree_paths import map_with_path
from eqxtl.io.checkpoint import state_dict
from eqxtl.models.layers import Conv2d, dense
from eqxtl.models.layers.quantized import NF4_BLOCK, NF4_LEVELS, Int8Weight, NF4Weight, is_quantized
from tests._tiny import tiny_architecture
from tests.test_efficientnet import canonical as canonical  # noqa: F401  (fixtures)
from tests.test_efficientnet import images as images  # noqa: F401
from tests.test_efficientnet import jax_logits as jax_logits  # noqa: F401
from tests.test_efficientnet import loaded as loaded  # noqa: F401
from tests.test_train import batch

QV = r".*\.(q_proj|v_proj)"
INT8_TINY_RTOL = 0.04  # int8 vs float32 outputs of the tiny random CLIP (measured ~0.006)
# EfficientNet-Lite0 (real weights), chelsea + coffee at 224: relative error of the pooled
# features with every ungrouped convolution in int8 (measured 0.061 and 0.093 with the
# depthwise ones too; see eqxtl.quantize)
LITE0_FEATURES_RTOL = 0.10


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def int8_weights(model) -> list[Int8Weight]:
    is_q = lambda x: isinstance(x, Int8Weight)  # noqa: E731
    return [x for x in jax.tree.leaves(model, is_leaf=is_q) if is_q(x)]


def dequantized(model):
    """``model`` with every quantized (int8, NF4) weight replaced by its float32 value."""
    return jax.tree.map(
        lambda x: x.dequantize() if is_quantized(x) else x, model, is_leaf=is_quantized
    )


def nf4_weights(model) -> list[NF4Weight]:
    is_q = lambda x: isinstance(x, NF4Weight)  # noqa: E731
    return [x for x in jax.tree.leaves(model, is_leaf=is_q) if is_q(x)]


def perturb(model, seed: int):
    """Non-zero ``lora_b`` (``B = 0`` at init would hide the adapters' part of every check)."""
    rng = np.random.default_rng(seed)

    def change(path, x):
        if eqx.is_array(x) and path.endswith("lora_b"):
            return jnp.asarray(0.05 * rng.normal(size=x.shape), x.dtype)
        return x

    return map_with_path(change, model)


@eqx.filter_jit
def forward(model, state, x):
    return eqxtl.batched(model)(x, state)[0]


def adapters_train_on(model, q, state, rtol: float, held):
    """Checks LoRA on the quantized base ``q`` of ``model``: its outputs are those of the
    dequantized base (and within ``rtol`` of the float model's), the adapters' gradients equal
    the dequantized model's, and a training step moves the adapters and the head but never the
    arrays ``held(model)`` lists for each quantized weight. Returns ``(outputs, images)``."""
    b = batch(0, size=4)
    x = jnp.asarray(b["image"])
    y, y_float = forward(q, state, x), forward(model, state, x)
    np.testing.assert_allclose(y, forward(dequantized(q), state, x), rtol=1e-5, atol=1e-5)
    assert rel(y, y_float) <= rtol

    loss = eqxtl.task_loss()

    def grads(m):
        trainable, frozen = eqx.partition(m, eqxtl.lora_spec(m, "head"))
        g = eqx.filter_grad(lambda t: loss(eqx.combine(t, frozen), state, b, None)[0])
        return jax.tree.leaves(eqx.filter_jit(g)(trainable))

    for got, want in zip(grads(q), grads(dequantized(q)), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)

    spec = eqxtl.lora_spec(q, "head")
    trains = [p for p, on in zip(eqxtl.paths(q), jax.tree.leaves(spec), strict=True) if on]
    optimizer = optax.adam(1e-2)
    step = eqxtl.make_step(loss, optimizer, spec)
    new, _, _, metrics = step(q, state, optimizer.init(eqx.filter(q, spec)), b, jax.random.key(0))
    assert np.isfinite(metrics["loss"])
    for before, after in zip(held(q), held(new), strict=True):
        for a, c in zip(before, after, strict=True):
            assert np.array_equal(a, c)
    moved = [p for p, a, c in zip(eqxtl.paths(q), jax.tree.leaves(q), jax.tree.leaves(new),
                                  strict=True) if not np.array_equal(a, c)]  # fmt: skip
    assert moved and set(moved) <= set(trains)
    return y, x


@pytest.fixture(scope="module")
def lora_int8():
    """A tiny CLIP classifier with non-zero q/v adapters; ``(float model, int8 model, state)``
    (the base frozen and stored as int8)."""
    backbone, state = tiny_architecture("clip_vision")
    model = eqxtl.Classifier(backbone, 3, key=jax.random.key(1))
    model = perturb(eqxtl.lora(model, QV, rank=4, key=jax.random.key(2)), 1)
    return model, eqxtl.quantize(model, eqxtl.lora_spec(model, "head")), state


def build(cls, *args, seed: int = 0, **kwargs):
    """``cls(*args, **kwargs)`` with N(0, 1) weights drawn in numpy (eager JAX init compiles
    once per shape)."""
    skeleton = eqx.filter_eval_shape(cls, *args, **kwargs, key=jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype),
        skeleton,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
    )


def test_int8_layers_compute_with_their_dequantized_weights():
    linear = build(eqx.nn.Linear, 24, 16)
    convs = [build(Conv2d, 8, 12, 3, stride=2, padding=1), build(Conv2d, 8, 12, 1, seed=1)]
    q = eqxtl.quantize({"fc": linear, "convs": convs}, False)
    for layer, plain in zip([q["fc"], *q["convs"]], [linear, *convs], strict=True):
        w, scale = layer.weight, layer.weight.scale
        assert w.values.dtype == jnp.int8 and scale.shape == (plain.weight.shape[0],)
        error = np.abs(np.asarray(w.dequantize()) - np.asarray(plain.weight))
        bound = np.asarray(scale).reshape(-1, *(1,) * (plain.weight.ndim - 1)) / 2
        assert np.all(error <= bound * (1 + 1e-5))  # each element within half a step
        assert np.abs(np.asarray(w.values)).max() == 127  # absmax: the largest is +-127
    rng = np.random.default_rng(2)
    x, image = jnp.asarray(rng.normal(size=(5, 24))), jnp.asarray(rng.normal(size=(9, 9, 8)))

    @eqx.filter_jit
    def pairs(q):  # (int8 layer's output, float layer's with the dequantized weight)
        plain = dequantized(q)
        out = [(dense(q["fc"], x), dense(plain["fc"], x))]
        # a user's own module calls eqx.nn.Linear directly (W @ x): the same product
        out += [(jax.vmap(q["fc"])(x), dense(plain["fc"], x))]
        return out + [(a(image), b(image)) for a, b in zip(q["convs"], plain["convs"], strict=True)]

    for got, want in pairs(q):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_int8_layers_stay_finite_under_float16_compute():
    # int8 applies its scale to the output; the unscaled product is 127 / absmax times the
    # layer's: with float16 compute it overflowed (here 50 * 2540 > 65504) where the float
    # layer is finite. Under float16 the scale goes on the weight.
    rng = np.random.default_rng(3)
    w = 0.05 * np.sign(rng.normal(size=(16, 24)))
    w[0] = 0.05  # row 0's output: 0.05 * sum(x), about 50
    w[1:] *= rng.uniform(0.01, 1.0, size=(15, 1))  # scales down to 4e-6: subnormal in float16
    linear = eqx.tree_at(lambda m: m.weight, build(eqx.nn.Linear, 24, 16), jnp.asarray(w))
    conv = build(Conv2d, 8, 12, 3, padding=1)
    conv = eqx.tree_at(lambda m: m.weight, conv, 0.002 * conv.weight)
    q = eqxtl.quantize({"fc": linear, "conv": conv}, False)
    x = jnp.asarray(40.0 * np.abs(rng.normal(size=(5, 24))) + 20.0, jnp.float16)
    image = jnp.asarray(rng.normal(size=(9, 9, 8)) * 400.0, jnp.float16)

    @eqx.filter_jit
    def outputs(m):
        def loss(x, image):
            return jnp.sum(dense(m["fc"], x)) + jnp.sum(m["conv"](image))

        return dense(m["fc"], x), m["conv"](image), jax.grad(loss, argnums=(0, 1))(x, image)

    got, want = outputs(q), outputs(dequantized(q))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == jnp.float16 and np.all(np.isfinite(np.asarray(g, np.float32)))
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=2e-2, atol=1e-2
        )
    assert float(jnp.max(jnp.abs(got[0]))) > 26  # outputs where the old product overflowed


def test_lora_on_an_int8_base(lora_int8):
    model, q, state = lora_int8
    # every frozen linear weight (the adapted q/v bases too) is int8; adapters and head float
    assert len(int8_weights(q)) == 6 * 3  # tiny CLIP: 3 blocks of q, k, v, out, fc1, fc2
    spec = eqxtl.lora_spec(q, "head")
    trains = [p for p, on in zip(eqxtl.paths(q), jax.tree.leaves(spec), strict=True) if on]
    assert trains and all(".lora_" in p or p.startswith("head.") for p in trains)

    # a quarter of the float32 bytes, plus one float32 scale per output channel (32 wide)
    stored = sum(w.values.nbytes + w.scale.nbytes for w in int8_weights(q))
    assert stored <= 0.3 * sum(4 * w.values.size for w in int8_weights(q))

    held = lambda m: [(w.values, w.scale) for w in int8_weights(m)]  # noqa: E731
    adapters_train_on(model, q, state, INT8_TINY_RTOL, held)


def test_quantize_then_lora_is_lora_then_quantize(lora_int8):
    model, q, state = lora_int8
    backbone, _ = tiny_architecture("clip_vision")
    plain = eqxtl.Classifier(backbone, 3, key=jax.random.key(1))
    first = eqxtl.quantize(plain, eqxtl.trainable(plain, "head"))
    adapted = perturb(eqxtl.lora(first, QV, rank=4, key=jax.random.key(2)), 1)
    assert jax.tree.structure(adapted) == jax.tree.structure(q)
    for a, b in zip(jax.tree.leaves(adapted), jax.tree.leaves(q), strict=True):
        np.testing.assert_array_equal(a, b)
    # DoRA's magnitudes come from the dequantized weights (what the layer computes with)
    dora = eqxtl.lora(first, QV, rank=4, dora=True, key=jax.random.key(2))
    x = jnp.asarray(batch(1, size=2)["image"])
    np.testing.assert_allclose(forward(dora, state, x), forward(first, state, x), rtol=1e-5,
                               atol=1e-5)  # fmt: skip


def test_merge_save_load_remat_scan(lora_int8, tmp_path):
    model, q, state = lora_int8
    x = jnp.asarray(batch(2, size=2)["image"])
    want = forward(q, state, x)
    # merge_lora dequantizes the adapted layers: float32 weights (the other int8 weights stay),
    # same outputs as the adapted int8 model
    merged = eqxtl.merge_lora(q)
    assert len(int8_weights(merged)) == len(int8_weights(q)) - 2 * 3
    assert merged.backbone.encoder.layers[0].self_attn.q_proj.weight.dtype == jnp.float32
    np.testing.assert_allclose(forward(merged, state, x), want, rtol=1e-5, atol=1e-5)

    # saving writes the dequantized float32 weights in the usual layout; quantize again
    plain = eqxtl.quantize(merged, eqxtl.trainable(merged, "head"))
    eqxtl.save_pretrained(plain, state, tmp_path)
    again, again_state = eqxtl.from_pretrained(tmp_path, keep_head=True)
    saved = state_dict(again.backbone, again_state)
    for name, value in state_dict(dequantized(plain).backbone, state).items():
        np.testing.assert_array_equal(saved[name], value, err_msg=name)
    requantized = eqxtl.quantize(again, eqxtl.trainable(again, "head"))
    for a, b in zip(int8_weights(requantized), int8_weights(plain), strict=True):
        np.testing.assert_array_equal(a.values, b.values)
        np.testing.assert_allclose(a.scale, b.scale, rtol=1e-6)

    # blocks recomputed in the backward pass, or unrolled (scanned by default): the same
    for variant in (eqxtl.with_remat(q), eqxtl.with_scan(q, False)):
        np.testing.assert_allclose(forward(variant, state, x), want, rtol=1e-5, atol=1e-5)


def test_bfloat16_storage_of_frozen_leaves():
    backbone, state = tiny_architecture("clip_vision")
    model = eqxtl.Classifier(backbone, 3, key=jax.random.key(1))
    small = eqxtl.quantize(model, eqxtl.trainable(model, "head"), "bfloat16")
    dtypes = {p: x.dtype for p, x in zip(eqxtl.paths(small), jax.tree.leaves(small), strict=True)}
    assert {d for p, d in dtypes.items() if p.startswith("head.")} == {jnp.dtype(jnp.float32)}
    assert {d for p, d in dtypes.items() if p.startswith("backbone.")} == {jnp.dtype(jnp.bfloat16)}
    x = jnp.asarray(batch(3, size=2)["image"])
    y = forward(small, state, x)
    assert y.dtype == jnp.float32  # float32 compute by default: the weights are cast up
    assert rel(y, forward(model, state, x)) <= 0.02
    assert eqxtl.count(small) == eqxtl.count(model)
    # training a leaf stored in bfloat16 is refused, naming it: Adam's small steps would
    # round away (every spec builder, and make_step for a spec made by hand)
    fc1 = r"backbone\.encoder\.layers\.1\.mlp\.fc1\.weight"
    with pytest.raises(eqxtl.RuleError, match=f"eqxtl.trainable: .*bfloat16.*{fc1}"):
        eqxtl.trainable(small, "head", "backbone.encoder.layers.1.mlp")
    with pytest.raises(eqxtl.RuleError, match="eqxtl.everything: .*bfloat16"):
        eqxtl.everything(small)
    with pytest.raises(eqxtl.RuleError, match="eqxtl.param_groups: .*bfloat16"):
        eqxtl.param_groups(small, [("head", optax.adam(1e-3)), (".*", optax.adam(1e-5))])
    by_hand = jax.tree.map(lambda x: eqx.is_inexact_array(x), small)
    optimizer = optax.adam(1e-5)
    step = eqxtl.make_step(eqxtl.task_loss(), optimizer, by_hand)
    opt_state = optimizer.init(eqx.filter(small, by_hand))
    with pytest.raises(eqxtl.TrainingError, match="make_step: .*bfloat16.*dtype=jnp.float32"):
        step(small, state, opt_state, batch(3, size=2), jax.random.key(0))
    # what stays frozen in bfloat16 is fine
    assert eqxtl.trainable(small, "head") is not None


def test_bad_input(lora_int8):
    model, q, state = lora_int8
    x = jnp.ones((2, 32))
    # training an int8 weight: refused by every spec builder, naming the leaf
    layer = "backbone.encoder.layers.0.mlp.fc1.weight"
    with pytest.raises(eqxtl.RuleError, match=layer.replace(".", r"\.")):
        eqxtl.trainable(q, "backbone.encoder.layers.0.mlp")
    with pytest.raises(eqxtl.RuleError, match="stored quantized"):
        eqxtl.everything(q)
    with pytest.raises(eqxtl.RuleError, match="stored quantized"):
        eqxtl.param_groups(q, [(".*", optax.adam(1e-3))])
    with pytest.raises(eqxtl.RuleError, match="stored quantized"):
        eqxtl.quantize(q, eqxtl.frozen(model, "head"), "bfloat16")  # a spec of the float model
    # ... and differentiating a scale directly, at trace time
    fc = eqx.tree_at(lambda m: m.weight, build(eqx.nn.Linear, 32, 32), int8_weights(q)[0])
    with pytest.raises(TypeError, match="frozen"):
        jax.grad(lambda s: dense(eqx.tree_at(lambda m: m.weight.scale, fc, s), x).sum())(
            fc.weight.scale
        )
    with pytest.raises(eqxtl.EqxtlError, match="dtype must be 'int8'"):
        eqxtl.quantize(model, False, "float16")
    with pytest.raises(eqxtl.EqxtlError, match="nothing to store"):
        eqxtl.quantize(q, eqxtl.lora_spec(q, "head"))  # already int8
    # weights int8 cannot hold: named
    empty = {"fc": build(eqx.nn.Linear, 4, 0)}
    with pytest.raises(eqxtl.EqxtlError, match=r"fc\.weight as int8.*no element"):
        eqxtl.quantize(empty, False)
    broken = eqx.tree_at(lambda m: m.weight, build(eqx.nn.Linear, 4, 3), jnp.full((3, 4), jnp.nan))
    with pytest.raises(eqxtl.EqxtlError, match="NaN or infinite"):
        eqxtl.quantize([broken], False)


def test_lite0_int8_on_photographs(loaded, images, jax_logits):  # noqa: F811
    backbone, head, state = loaded
    features, logits = jax_logits
    q = eqxtl.quantize(backbone, False)
    assert len(int8_weights(q)) == 1 + 2 * 16 - 1 + 1  # stem, expand + project, head conv
    got = forward(q, state, jnp.asarray(images))
    for i in range(len(images)):
        assert rel(got[i], features[i]) <= LITE0_FEATURES_RTOL
    np.testing.assert_array_equal(jax.vmap(head)(got).argmax(-1), logits.argmax(-1))


def test_quantize_while_loading(tmp_path):
    """``from_pretrained`` / ``from_config(quantize="int8")``: ``eqxtl.quantize(model,
    False)``'s model, weight by weight, without the float model (depthwise convolutions
    stay float); a bad value or a weight int8 cannot hold is named."""
    from eqxtl.models import efficientnet
    from tests._tiny import TINY_EFFICIENTNET

    backbone, state = tiny_architecture(efficientnet.EFFICIENTNET_LITE.name)
    eqxtl.save_pretrained(backbone, state, tmp_path / "lite")
    built = {
        "from_pretrained": (
            eqxtl.from_pretrained(tmp_path / "lite")[0],
            eqxtl.from_pretrained(tmp_path / "lite", quantize="int8")[0],
        ),
        "from_config": (
            eqxtl.from_config(TINY_EFFICIENTNET, seed=3)[0],
            eqxtl.from_config(TINY_EFFICIENTNET, seed=3, quantize="int8")[0],
        ),
    }
    for how, (plain, loaded_int8) in built.items():
        expected = eqxtl.quantize(plain, False, "int8")
        a, b = (jax.tree.leaves(eqx.filter(m, eqx.is_array)) for m in (loaded_int8, expected))
        assert jax.tree.structure(loaded_int8) == jax.tree.structure(expected), how
        assert all(
            x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b, strict=True)
        ), how
        kernels = [w for w in jax.tree.leaves(eqx.filter(plain, eqx.is_array)) if w.ndim == 4]
        assert 0 < len(int8_weights(loaded_int8)) < len(kernels)  # depthwise ones stay float
    # with dtype=bfloat16 too, each int8 weight is within half a step of the file's value
    # (not of its bfloat16 rounding, which added up to 1.5 times that)
    small = eqxtl.from_pretrained(tmp_path / "lite", dtype=jnp.bfloat16, quantize="int8")[0]
    exact = eqxtl.quantize(built["from_pretrained"][0], False, "int8")
    for got, want in zip(int8_weights(small), int8_weights(exact), strict=True):
        assert np.array_equal(got.values, want.values) and np.array_equal(got.scale, want.scale)
    assert {x.dtype for x in jax.tree.leaves(eqx.filter(small, eqx.is_inexact_array))} == {
        jnp.dtype(jnp.bfloat16),
        jnp.dtype(jnp.float32),  # the rest bfloat16, scales float32
    }
    with pytest.raises(
        eqxtl.EqxtlError, match="quantize must be None, 'int8' .* or 'nf4' .*bfloat16"
    ):
        eqxtl.from_pretrained(tmp_path / "lite", quantize="bfloat16")
    tensors = dict(state_dict(backbone, state))
    name = next(n for n in tensors if n.endswith("weight") and tensors[n].ndim == 4)
    tensors[name] = np.full(tensors[name].shape, np.nan, np.float32)
    from safetensors.numpy import save_file

    save_file({k: np.asarray(v) for k, v in tensors.items()}, tmp_path / "nan.safetensors")
    with pytest.raises(eqxtl.CheckpointError, match=rf"{name.replace('.', '[.]')} as int8"):
        eqxtl.from_pretrained(
            tmp_path / "nan.safetensors", config=TINY_EFFICIENTNET, quantize="int8"
        )


NF4_TINY_RTOL = 0.1  # NF4 vs float32 outputs of the tiny random CLIP (measured ~0.05)


def test_nf4_codes_are_the_nearest_levels():
    linear = build(eqx.nn.Linear, 70, 5)  # 350 weights: 6 blocks, the last one padded
    zeroed = linear.weight.reshape(-1).at[NF4_BLOCK : 2 * NF4_BLOCK].set(0.0).reshape(5, 70)
    linear = eqx.tree_at(lambda m: m.weight, linear, zeroed)
    conv = build(Conv2d, 8, 12, 3, padding=1)
    q = eqxtl.quantize({"fc": linear, "conv": conv}, False, "nf4")
    assert q["conv"].weight is conv.weight  # convolutions stay float (QLoRA: linear layers)
    w = q["fc"].weight
    assert isinstance(w, NF4Weight) and w.shape == (5, 70) and w.dtype == jnp.float32
    assert w.codes.dtype == jnp.uint8 and w.codes.shape == (6 * NF4_BLOCK // 2,)
    assert w.absmax.shape == (6,)
    assert w.codes.nbytes + w.absmax.nbytes == 6 * NF4_BLOCK // 2 + 6 * 4  # half a byte each

    # brute force: each block over its absmax, the nearest level, times the absmax
    flat = np.concatenate([np.asarray(zeroed).reshape(-1), np.zeros(6 * NF4_BLOCK - 350)])
    blocks = flat.reshape(6, NF4_BLOCK)
    absmax = np.abs(blocks).max(axis=1)
    np.testing.assert_allclose(w.absmax, absmax, rtol=1e-7)
    levels = np.asarray(NF4_LEVELS)
    scaled = blocks / np.where(absmax > 0, absmax, 1.0)[:, None]
    nearest = levels[np.abs(scaled[..., None] - levels).argmin(axis=-1)]
    want = (nearest * absmax[:, None]).reshape(-1)[:350].reshape(5, 70)
    np.testing.assert_allclose(w.dequantize(), want, rtol=1e-6, atol=1e-7)
    assert not np.any(np.asarray(w.dequantize()).reshape(-1)[NF4_BLOCK : 2 * NF4_BLOCK])
    # the largest of each block is stored exactly (+-1 times the absmax)
    assert np.allclose(np.abs(np.asarray(w.dequantize())).max(), absmax.max())

    x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 70)))
    np.testing.assert_allclose(
        dense(q["fc"], x), x @ w.dequantize().T + linear.bias, rtol=1e-5, atol=1e-5
    )


@pytest.fixture(scope="module")
def lora_nf4(lora_int8):
    model, _, state = lora_int8
    return model, eqxtl.quantize(model, eqxtl.lora_spec(model, "head"), "nf4"), state


def test_lora_on_an_nf4_base(lora_nf4, tmp_path):
    model, q, state = lora_nf4
    assert len(nf4_weights(q)) == 6 * 3 and not int8_weights(q)  # every frozen linear weight
    assert eqxtl.count(q) == eqxtl.count(model)  # an NF4 weight counts as the weights it holds
    stored = sum(w.codes.nbytes + w.absmax.nbytes for w in nf4_weights(q))
    assert stored <= 0.16 * sum(4 * np.prod(w.shape) for w in nf4_weights(q))  # ~1/8 + pads
    with pytest.raises(eqxtl.RuleError, match="stored quantized"):
        eqxtl.everything(q)

    held = lambda m: [(w.codes, w.absmax) for w in nf4_weights(m)]  # noqa: E731
    y, x = adapters_train_on(model, q, state, NF4_TINY_RTOL, held)

    # merged: float32 weights, the same outputs; saved: the dequantized weights
    merged = eqxtl.merge_lora(q)
    assert len(nf4_weights(merged)) == len(nf4_weights(q)) - 2 * 3
    np.testing.assert_allclose(forward(merged, state, x), y, rtol=1e-5, atol=1e-5)
    eqxtl.save_pretrained(merged, state, tmp_path)
    again, again_state = eqxtl.from_pretrained(tmp_path, keep_head=True)
    saved = state_dict(again.backbone, again_state)
    for name, value in state_dict(dequantized(merged).backbone, state).items():
        np.testing.assert_array_equal(saved[name], value, err_msg=name)
    for variant in (eqxtl.with_remat(q), eqxtl.with_scan(q, False)):
        np.testing.assert_allclose(forward(variant, state, x), y, rtol=1e-5, atol=1e-5)


def test_a_quantized_linear_layer_called_directly_computes_as_dense():
    """``eqx.nn.Linear.__call__`` (a user's own module) multiplies ``W @ x``: an int8 or
    NF4 weight gives what ``eqxtl.dense`` gives, with gradients; a convolution weight is not
    a matrix, and says so."""
    linear = build(eqx.nn.Linear, 128, 16)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(128,)), jnp.float32)
    for dtype in ("int8", "nf4"):
        q = eqxtl.quantize({"fc": linear}, False, dtype)["fc"]
        np.testing.assert_allclose(q(x), dense(q, x), rtol=1e-6, atol=1e-6)
        grad = jax.grad(lambda x, q=q: jnp.sum(q(x) ** 2))(x)
        want = jax.grad(lambda x, q=q: jnp.sum(dense(q, x) ** 2))(x)
        np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)
    conv = eqxtl.quantize(build(Conv2d, 8, 12, 3), False).weight
    with pytest.raises(TypeError, match="linear weight"):
        conv @ jnp.ones(8)


def test_nf4_bad_input():
    conv_only = {"conv": build(Conv2d, 8, 12, 3)}
    with pytest.raises(eqxtl.EqxtlError, match="nf4 stores linear layers only.*dtype='int8'"):
        eqxtl.quantize(conv_only, False, "nf4")
    broken = eqx.tree_at(lambda m: m.weight, build(eqx.nn.Linear, 4, 3), jnp.full((3, 4), jnp.inf))
    with pytest.raises(eqxtl.EqxtlError, match=r"0\.weight as nf4.*NaN or infinite"):
        eqxtl.quantize([broken], False, "nf4")
    with pytest.raises(eqxtl.EqxtlError, match="'nf4' \\(frozen linear weights"):
        eqxtl.quantize(conv_only, False, "nf3")


def test_nf4_while_loading(tmp_path):
    """``from_pretrained`` / ``from_config(quantize="nf4")``: ``eqxtl.quantize(model, False,
    "nf4")``'s model, weight by weight (convolutions, here the patch embedding, stay float)."""
    from tests._tiny import TINY_CONFIGS

    config = TINY_CONFIGS["clip_vision"]
    backbone, state = tiny_architecture("clip_vision")
    eqxtl.save_pretrained(backbone, state, tmp_path / "clip")
    built = {
        "from_pretrained": (backbone, eqxtl.from_pretrained(tmp_path / "clip", quantize="nf4")[0]),
        "from_config": (
            eqxtl.from_config(config, seed=3)[0],
            eqxtl.from_config(config, seed=3, quantize="nf4")[0],
        ),
    }
    for how, (plain, loaded_nf4) in built.items():
        expected = eqxtl.quantize(plain, False, "nf4")
        assert jax.tree.structure(loaded_nf4) == jax.tree.structure(expected), how
        a, b = (jax.tree.leaves(eqx.filter(m, eqx.is_array)) for m in (loaded_nf4, expected))
        assert all(
            x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b, strict=True)
        ), how
        assert len(nf4_weights(loaded_nf4)) == 6 * config.num_hidden_layers, how
        assert not any(np.ndim(w) == 4 and w.dtype != jnp.float32 for w in a), how


@pytest.fixture(scope="module")
def adapted_clip():
    """A tiny CLIP classifier with q/v adapters, and the spec that trains them and the head."""
    backbone, state = tiny_architecture("clip_vision")
    model = eqxtl.Classifier(backbone, 3, key=jax.random.key(1))
    adapted = eqxtl.lora(model, QV, rank=2, key=jax.random.key(2))
    return model, state, adapted, eqxtl.lora_spec(adapted, "head")


@pytest.mark.parametrize("dtype", ["int8", "nf4", "bfloat16"])
def test_summary_counts_a_quantized_weight_as_the_weights_it_stands_for(adapted_clip, dtype):
    _, _, adapted, spec = adapted_clip
    small = eqxtl.quantize(adapted, spec, dtype)
    small_spec = eqxtl.lora_spec(small, "head")
    want = eqxtl.summary(adapted, spec, print_it=False).splitlines()[-1]
    assert eqxtl.summary(small, small_spec, print_it=False).splitlines()[-1] == want
    assert eqxtl.count(small, small_spec) == eqxtl.count(adapted, spec)


def test_a_head_stored_in_bfloat16_still_gives_float32_logits(adapted_clip):
    model, state, _, _ = adapted_clip
    small = eqxtl.quantize(model, False, "bfloat16")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 32, 32)), jnp.float32)
    logits, _ = small(x, state)
    features, _ = small.backbone(x, state)
    w, b = (np.asarray(a, np.float64) for a in (small.head.weight, small.head.bias))
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, np.asarray(features, np.float64) @ w.T + b, rtol=1e-5)


def test_adapters_on_a_bfloat16_base_are_float32(adapted_clip):
    model, _, _, _ = adapted_clip
    small = eqxtl.quantize(model, False, "bfloat16")
    for dora in (False, True):
        adapted = eqxtl.lora(small, QV, rank=2, dora=dora, key=jax.random.key(3))
        trainable = eqx.filter(adapted, eqxtl.lora_spec(adapted))
        dtypes = {x.dtype for x in jax.tree.leaves(trainable)}
        assert dtypes == {jnp.dtype(jnp.float32)}, (dora, dtypes)


def test_modules_to_save_over_an_int8_module_are_written_dequantized(adapted_clip, tmp_path):
    model, _, adapted, spec = adapted_clip
    small = eqxtl.quantize(adapted, spec, "int8")
    mlp = "backbone.encoder.layers.0.mlp"
    eqxtl.save_adapter(small, tmp_path, modules_to_save=[mlp])
    loaded = eqxtl.load_adapter(model, tmp_path)
    fc1 = small.backbone.encoder.layers[0].mlp.fc1.weight
    assert isinstance(fc1, Int8Weight)
    np.testing.assert_array_equal(
        loaded.backbone.encoder.layers[0].mlp.fc1.weight, fc1.dequantize()
    )


def test_load_adapter_names_a_weight_stored_quantized(adapted_clip, tmp_path):
    model, _, adapted, _ = adapted_clip
    eqxtl.save_adapter(adapted, tmp_path, modules_to_save=["head"])
    with pytest.raises(eqxtl.CheckpointError, match="stored quantized in this model"):
        eqxtl.load_adapter(eqxtl.quantize(model, False, "int8"), tmp_path)


@pytest.mark.parametrize("spec", ["head", 1])
def test_a_spec_that_is_not_true_or_false_is_refused(adapted_clip, spec):
    model, _, _, _ = adapted_clip
    for dtype in ("int8", "bfloat16"):
        with pytest.raises(eqxtl.RuleError, match="True / False"):
            eqxtl.quantize(model, spec, dtype)


def test_bfloat16_with_nothing_frozen_says_nothing_is_stored(adapted_clip):
    model, _, _, _ = adapted_clip
    with pytest.raises(eqxtl.EqxtlError, match="nothing to store as bfloat16"):
        eqxtl.quantize(model, True, "bfloat16")
    with pytest.raises(eqxtl.EqxtlError, match="nothing to store as bfloat16"):
        eqxtl.quantize(eqxtl.quantize(model, False, "bfloat16"), False, "bfloat16")


def test_unmerge_lora_refuses_a_merged_model_quantized_again():
    linear = eqx.nn.Linear(16, 8, key=jax.random.key(0))
    adapted = eqxtl.lora({"fc": linear}, "fc", rank=2, key=jax.random.key(1))
    merged = eqxtl.merge_lora(adapted)
    with pytest.raises(eqxtl.AdapterError, match="quantized"):
        eqxtl.unmerge_lora(eqxtl.quantize(merged, False, "int8"), adapted)
