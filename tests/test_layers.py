"""``eqxtl.Conv2d``'s own paths (1x1 kernels as matrix products, larger kernels' gradients
as products over shifted views, per tap or im2col) equal XLA's convolution and its
gradients: batched, unbatched, per example, and forward mode; its depthwise fast path
equals XLA's grouped convolution; ``max_pool`` equals PyTorch's ``max_pool2d``, gradients
(ties included) too."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqxtl


def reference(conv, x):
    """XLA's own (grouped) convolution with ``conv``'s weights, on one image."""
    y = jax.lax.conv_general_dilated(
        x[None],
        conv.weight,
        conv.stride,
        conv.padding,
        rhs_dilation=conv.dilation,
        dimension_numbers=("NHWC", "OIHW", "NHWC"),
        feature_group_count=conv.groups,
    )[0]
    return y + conv.bias


def close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kernel, stride, padding, channels",
    [
        (1, 1, 0, 5),
        (1, 2, 0, 5),
        (1, 2, "SAME", 5),
        (1, 1, ((1, 0), (0, 2)), 5),
        (3, 1, 1, 5),  # im2col kernel gradient (few input channels)
        (3, 2, "SAME", 5),
        (7, 2, 3, 3),  # ResNet's stem
        (3, 1, 1, 17),  # one product per kernel tap
        (3, 2, ((0, 1), (2, 0)), 16),
    ],
)
def test_gradients_match_xla_convolution(kernel, stride, padding, channels):
    conv = eqxtl.Conv2d(channels, 7, kernel, stride=stride, padding=padding, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (3, 9, 9, channels))
    ours, ref = (lambda c, xi: c(xi)), reference

    def batched_loss(conv, x, f):
        return jnp.sum(jnp.sin(jax.vmap(f, in_axes=(None, 0))(conv, x)))

    close(jax.vmap(conv)(x), jax.vmap(lambda xi: reference(conv, xi))(x))
    g, g_ref = (jax.grad(batched_loss, (0, 1))(conv, x, f) for f in (ours, ref))
    close(g[0].weight, g_ref[0].weight)
    close(g[0].bias, g_ref[0].bias)
    close(g[1], g_ref[1])

    def per_example(f):
        return jax.vmap(lambda xi: jax.grad(lambda c: jnp.sum(f(c, xi) ** 2))(conv).weight)(x)

    close(per_example(ours), per_example(ref))  # grad inside vmap stays per example

    w_grad = [jax.grad(lambda c, f=f: jnp.sum(f(c, x[0]) ** 2))(conv).weight for f in (ours, ref)]
    close(*w_grad)

    tangent = jax.tree.map(jnp.ones_like, conv)
    jvps = [jax.jvp(lambda c, f=f: f(c, x[0]), (conv,), (tangent,))[1] for f in (ours, ref)]
    close(*jvps)


@pytest.mark.parametrize(
    "size, kernel, stride, padding",
    [
        (17, 3, 1, 1),
        (17, 3, 2, "SAME"),
        (16, 5, 2, "SAME"),
        (15, 5, 1, ((1, 3), (2, 2))),
        (9, 3, 2, 0),
    ],
)
def test_depthwise_matches_grouped_convolution(size, kernel, stride, padding):
    channels = 6
    conv = eqxtl.Conv2d(
        channels,
        channels,
        kernel,
        stride=stride,
        padding=padding,
        groups=channels,
        key=jax.random.key(0),
    )
    x = jax.random.normal(jax.random.key(1), (size, size, channels))
    np.testing.assert_allclose(conv(x), reference(conv, x), rtol=1e-5, atol=1e-5)

    def loss(fn):
        return lambda conv, x: jnp.sum(jnp.sin(fn(conv, x)))

    got = jax.grad(loss(lambda c, x: c(x)), argnums=(0, 1))(conv, x)
    want = jax.grad(loss(reference), argnums=(0, 1))(conv, x)
    np.testing.assert_allclose(got[0].weight, want[0].weight, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size", [9, 12])
def test_max_pool_matches_torch(size):
    import torch

    from eqxtl.models.layers import max_pool

    rng = np.random.default_rng(0)
    # ReLU outputs: whole windows of zeros, so ties decide where the gradient goes
    x = np.maximum(rng.normal(size=(2, size, size, 4)), 0).astype(np.float32)
    x[1, 2, 3, 0] = np.nan
    y = max_pool(jnp.asarray(x), 3, 2, 1)
    tx = torch.tensor(np.nan_to_num(x)).permute(0, 3, 1, 2).requires_grad_()
    ty = torch.nn.functional.max_pool2d(tx, 3, 2, 1)
    want = torch.nn.functional.max_pool2d(torch.tensor(x).permute(0, 3, 1, 2), 3, 2, 1)
    np.testing.assert_array_equal(np.asarray(y), want.permute(0, 2, 3, 1).numpy())
    g = rng.normal(size=ty.shape).astype(np.float32)
    (ty * torch.tensor(g)).sum().backward()
    got = jax.grad(lambda x: jnp.sum(max_pool(x, 3, 2, 1) * jnp.asarray(g).transpose(0, 2, 3, 1)))(
        jnp.asarray(np.nan_to_num(x))
    )
    np.testing.assert_array_equal(np.asarray(got), tx.grad.permute(0, 2, 3, 1).numpy())
    assert max_pool(jnp.asarray(x[0]), 3, 2, 1).shape == y.shape[1:]  # one image


@pytest.mark.parametrize("kernel, groups", [(1, 1), (3, 1), (3, 8)])
def test_off_the_cpu_convolutions_are_xlas_own(kernel, groups, monkeypatch):
    # The dot / shifted-view paths are XLA:CPU choices; on a GPU (where XLA:GPU's Triton
    # GEMM fusion aborted on them) Conv2d lowers to XLA's convolution, with the same values.
    conv = eqxtl.Conv2d(8, 8, kernel, stride=2, padding=1, groups=groups, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (9, 9, 8))
    on_cpu = conv(x)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    jaxpr = str(jax.make_jaxpr(conv)(x))
    assert "conv_general_dilated" in jaxpr and "dot_general" not in jaxpr
    close(conv(x), on_cpu)
    close(conv(x), reference(conv, x))


@pytest.mark.parametrize("shape", [(2, 5, 5, 3), (16,), (1,), (3, 7)])
def test_relu_keeping_sign_bits_is_relu_with_a_bit_per_element(shape):
    from eqxtl.models.layers import relu_keeping_sign_bits as relu
    from eqxtl.models.layers.sign_bits import pack_bits, unpack_bits

    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    x.reshape(-1)[:3] = [0.0, -0.0, np.nan][: x.size]  # relu's gradient at 0 is 0; NaN: 0
    g = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    flags = x > 0
    np.testing.assert_array_equal(unpack_bits(pack_bits(flags), shape), flags)

    got, vjp = jax.vjp(relu, jnp.asarray(x))
    want, want_vjp = jax.vjp(jax.nn.relu, jnp.asarray(x))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(vjp(jnp.asarray(g))[0], want_vjp(jnp.asarray(g))[0])
    # what the backward pass keeps: the packed signs, not x
    kept = [r for r in jax.tree.leaves(vjp) if eqx.is_array(r)]
    assert sum(r.nbytes for r in kept) == -(-x.size // 8)

    # batched and compiled: the same per example
    batched = jax.jit(jax.vmap(jax.grad(lambda v: jnp.sum(relu(v) * v))))
    wanted = jax.vmap(jax.grad(lambda v: jnp.sum(jax.nn.relu(v) * v)))
    xs = jnp.stack([jnp.asarray(x), -jnp.asarray(x)])
    np.testing.assert_array_equal(batched(xs), wanted(xs))


@pytest.mark.parametrize("kernel, stride, dora", [(1, 1, False), (3, 2, False), (3, 1, True)])
def test_a_conv_adapter_computes_its_gradients_first_with_the_same_values(kernel, stride, dora):
    """``LoRAConv2d`` runs its adapter through ``gradients_first``: outputs and gradients
    (adapter weights, magnitude, input) equal those of the merged kernel, plain autodiff."""
    from eqxtl.models.layers import Conv2d, LoRAConv2d

    conv = Conv2d(4, 6, kernel, stride=stride, padding=kernel // 2, key=jax.random.key(0))
    (layer,) = eqxtl.lora([conv], r".*", rank=2, dora=dora, key=jax.random.key(1))
    assert isinstance(layer, LoRAConv2d)
    layer = eqx.tree_at(lambda m: m.lora_b, layer, 0.3 * jnp.ones_like(layer.lora_b))
    x = jax.random.normal(jax.random.key(2), (2, 9, 9, 4))
    g = jax.random.normal(jax.random.key(3), layer(x).shape)

    def merged(layer, x):
        weight = layer.weight + layer.delta()
        if dora:
            scale = layer.lora_magnitude / jax.lax.stop_gradient(
                jnp.sqrt(jnp.sum(jnp.square(weight.reshape(weight.shape[0], -1)), axis=1))
            )
            weight = weight * scale[:, None, None, None]
        plain = eqx.tree_at(lambda c: (c.weight, c.bias), conv, (weight, layer.bias))
        return jax.vmap(lambda v: reference(plain, v))(x)

    def loss(f):
        return lambda both: jnp.sum(f(*both) * g)

    close(layer(x), merged(layer, x))
    got = eqx.filter_grad(loss(lambda m, v: m(v)))((layer, x))
    want = eqx.filter_grad(loss(merged))((layer, x))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        close(a, b)


def test_gradients_first_shrinks_a_resnet_lora_step(monkeypatch):
    """What ``gradients_first`` is for: the compiled LoRA step of a small bottleneck ResNet
    needs fewer temporaries than with the adapter's plain backward pass (XLA then computes
    the adapters' weight gradients after the backward pass, keeping the feature maps)."""
    import dataclasses

    from eqxtl.models import resnet
    from eqxtl.models.layers import low_rank

    config = dataclasses.replace(
        resnet.RESNET50, embedding_size=16, hidden_sizes=(32, 64, 128, 256), depths=(2, 2, 2, 1)
    )
    backbone, state = eqx.nn.make_with_state(resnet.RESNET.build)(config, jax.random.key(0))
    model = eqxtl.Classifier(backbone, 3, key=jax.random.key(1))
    model = eqxtl.lora(model, r".*convolution", rank=4, key=jax.random.key(2))
    spec = eqxtl.lora_spec(model, "head")
    first = _step_temporaries(model, state, spec, (8, 3, 64, 64))
    monkeypatch.setattr(low_rank, "gradients_first", lambda fn, weights, x: fn(weights, x))
    plain = _step_temporaries(model, state, spec, (8, 3, 64, 64))
    assert first < 0.9 * plain, (first, plain)


def test_stored_gradients_keep_a_depthwise_lora_step_on_an_int8_base_small(monkeypatch):
    """What the depthwise convolution's ``stored_gradient`` is for: EfficientNet-Lite's LoRA
    step (adapters on the 1x1 convolutions) on an int8 base. Without it, XLA fused the tap
    terms of each depthwise input gradient into the adapted convolution's two backward
    products and stored every term at full size; with it, the step needs well under those
    temporaries."""
    from eqxtl.models import efficientnet
    from eqxtl.models.layers import conv
    from tests._tiny import TINY_EFFICIENTNET

    backbone, state = eqx.nn.make_with_state(efficientnet.EFFICIENTNET_LITE.build)(
        TINY_EFFICIENTNET, jax.random.key(0)
    )
    model = eqxtl.Classifier(backbone, 3, key=jax.random.key(1))
    adapted = r"backbone\._blocks\.\d+\.(_expand_conv|_project_conv)"
    model = eqxtl.lora(model, adapted, rank=2, key=jax.random.key(2))
    model = eqxtl.quantize(model, eqxtl.lora_spec(model, "head"), "int8")
    spec = eqxtl.lora_spec(model, "head")
    model = eqxtl.batchnorm_modes(model, spec)
    stored = _step_temporaries(model, state, spec, (4, 3, 64, 64))
    monkeypatch.setattr(conv, "stored_gradient", lambda h: h)
    plain = _step_temporaries(model, state, spec, (4, 3, 64, 64))
    assert stored < 0.6 * plain, (stored, plain)


def _step_temporaries(model, state, spec, images: tuple[int, ...]) -> int:
    """XLA's temporary bytes of the compiled Adam step of ``model`` training what ``spec``
    marks, on a classification batch of ``images`` of shape ``(n, 3, h, w)`` (from shapes)."""
    import optax

    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(eqx.filter(model, spec))
    batch = {
        "image": jax.ShapeDtypeStruct(images, jnp.float32),
        "label": jax.ShapeDtypeStruct(images[:1], jnp.int32),
    }
    step = eqxtl.make_step(eqxtl.task_loss(), optimizer, spec)
    return eqxtl.memory_report(step, model, state, opt_state, batch).temp


def test_a_resnet_forward_pass_stores_each_block_output(monkeypatch):
    """Blocks that nothing differentiates (a frozen backbone) store their outputs
    (``materialized``): left fused, each block's output was recomputed from its convolution
    outputs, which then stayed alive to the end of the stage. A head-only step needs fewer
    temporaries, and one image's NaN still reaches no other image (the predicate's witness
    is a weight, not the activations)."""
    import dataclasses

    from eqxtl.models import resnet

    config = dataclasses.replace(
        resnet.RESNET50, embedding_size=16, hidden_sizes=(32, 64, 128, 256), depths=(3, 2, 2, 1)
    )
    backbone, state = eqx.nn.make_with_state(resnet.RESNET.build)(config, jax.random.key(0))
    model = eqxtl.Classifier(backbone, 3, key=jax.random.key(1))
    spec = eqxtl.trainable(model, "head")

    images = jax.random.normal(jax.random.key(2), (3, 3, 64, 64)).at[1, 0, 5, 7].set(jnp.nan)
    logits, _ = eqxtl.batched(eqx.nn.inference_mode(model))(images, state)
    alone, _ = eqxtl.batched(eqx.nn.inference_mode(model))(images[::2], state)
    assert np.isnan(np.asarray(logits[1])).all()
    np.testing.assert_allclose(logits[::2], alone, rtol=1e-5, atol=1e-6)

    stored = _step_temporaries(model, state, spec, (8, 3, 64, 64))
    monkeypatch.setattr(resnet, "stored_if_forward_only", lambda h, block: h)
    fused = _step_temporaries(model, state, spec, (8, 3, 64, 64))
    assert stored < 0.8 * fused, (stored, fused)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_exact_gelu_matches_torch_and_jax(dtype):
    """``activation("gelu")`` and the CNNs' ``"gelu"`` are torch's exact GELU, values and
    gradients, over the tails too; in bfloat16 they return bfloat16, the float32 values
    rounded (torch computes half precision in float32; 1 + erf would cancel in bfloat16)."""
    import torch

    from eqxtl.models.layers import CNN_ACTIVATIONS
    from eqxtl.models.layers.transformer import activation

    x = np.linspace(-12.0, 12.0, 20001, dtype=np.float32)
    if dtype == "bfloat16":  # points that bfloat16 holds exactly
        x = np.unique(np.float32(jnp.asarray(x, jnp.bfloat16)))
    tx = torch.tensor(x, requires_grad=True)
    torch.nn.functional.gelu(tx).sum().backward()
    want = torch.nn.functional.gelu(torch.tensor(x)).numpy()
    exact = np.float32(jax.nn.gelu(jnp.asarray(x), approximate=False))
    # one bfloat16 rounding of the float32 value (two ulps for where the float32 erfs
    # differ); below -5, float32's 1 + erf(x / √2) cancels as torch's does (|GELU| < 1e-6)
    rtol, atol = (1e-6 if dtype == "float32" else 2.0**-7), 1e-6
    for gelu in (lambda v: activation("gelu", v), CNN_ACTIVATIONS["gelu"]):
        xj = jnp.asarray(x, dtype)
        got = gelu(xj)
        grad = jax.grad(lambda v, f=gelu: f(v).astype(jnp.float32).sum())(xj)
        assert got.dtype == grad.dtype == jnp.dtype(dtype)
        for reference in (want, exact):
            np.testing.assert_allclose(np.float32(got), reference, atol=atol, rtol=rtol)
        np.testing.assert_allclose(np.float32(grad), tx.grad.numpy(), atol=atol, rtol=rtol)
