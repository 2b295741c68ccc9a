"""LoRA / DoRA adapters: wrapping by path rules, specs, merge/unmerge, PEFT files both ways.

Tiny models for behaviour; CLIP-B/32 and ResNet-50 at their real configs (random init,
non-zero adapters) for parity with Hugging Face PEFT on the transformers models.
"""

import copy
import dataclasses
import json
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers

import eqxtl
from eqxtl.io import checkpoint
from eqxtl.models import resnet as R
from eqxtl.models.clip import LayerNorm
from eqxtl.tuning.filters import _zip_spec
from tests._tiny import TINY_RESNET, random_tensors
from tests._tiny import tiny as tiny_model
from tests.test_clip import b32 as b32  # noqa: F401  (session fixture: CLIP-B/32 directory)
from tests.test_clip import load as load_clip
from tests.test_resnet import _real
from tests.test_resnet import images as images  # noqa: F401  (fixture: 3 ImageNet inputs)
from tests.test_train import _flops, batch, classifier

TOL = 1e-4  # max |Δ| against transformers + PEFT (float32), as in test_clip / test_resnet
MERGE_RTOL = 1e-5  # merged vs adapted, relative to the largest output
QV = r".*\.(q_proj|v_proj)"


def perturb(model, seed: int, scale: float = 0.05):
    """Non-zero adapters: ``lora_b`` ~ N(0, scale), ``lora_a`` and DoRA magnitudes
    jittered (B = 0 at init would hide every bug of the adapter's forward)."""
    rng = np.random.default_rng(seed)

    def change(path, leaf):  # in numpy: eager jnp ops would compile once per shape
        if path.endswith("lora_b"):
            return jnp.asarray(scale * rng.normal(size=leaf.shape), leaf.dtype)
        if path.endswith(("lora_a", "lora_magnitude")):
            jitter = 1 + 0.1 * rng.normal(size=leaf.shape)
            return jnp.asarray(np.asarray(leaf) * jitter, leaf.dtype)
        return leaf

    from eqxtl._util.pytree_paths import map_with_path

    return map_with_path(lambda p, x: change(p, x) if eqx.is_array(x) else x, model)


@eqx.filter_jit
def outputs(model, state, x):
    return eqxtl.batched(model)(x, state)[0]


def trained(model, spec) -> set[str]:
    return {path for path, _, on in _zip_spec(model, spec) if on}


def max_diff(a, b) -> float:
    return float(jnp.max(jnp.abs(jnp.asarray(a) - jnp.asarray(b))))


def rel_diff(a, b) -> float:
    return max_diff(a, b) / float(jnp.max(jnp.abs(jnp.asarray(b))))


TARGETS = {"clip": [QV, "head"], "resnet": [r".*convolution", "head"]}


# --------------------------------------------------------------------------- wrapping


@pytest.mark.parametrize("arch, dora", [("clip", True)])  # LoRA: tests/test_architectures.py
def test_init_merge_unmerge_save(arch, dora, tmp_path):
    """B = 0: bit-identical outputs at init. Non-zero adapters: the merged plain model gives
    the adapted outputs, saves and loads like any plain model; unmerge gives them back."""
    model, state = classifier(arch)
    x = batch(0)["image"]
    adapted = eqxtl.lora(model, TARGETS[arch], rank=3, alpha=6, dora=dora, key=jax.random.key(0))
    before = outputs(model, state, x)
    if dora:  # magnitude = ||W||: the same function up to rounding
        assert rel_diff(outputs(adapted, state, x), before) <= 1e-6
    else:
        assert jnp.array_equal(outputs(adapted, state, x), before)
    paths = eqxtl.paths(adapted)
    assert set(eqxtl.paths(model)) <= set(paths)  # base weights keep their paths
    if arch == "clip":
        layer = "backbone.encoder.layers.3.self_attn.q_proj"
        leaves = ("weight", "bias", "lora_a", "lora_b", "lora_magnitude")
        assert {f"{layer}.{n}" for n in leaves} <= set(paths)
        assert "backbone.encoder.layers.3.self_attn.k_proj.lora_a" not in paths
        assert isinstance(adapted.backbone.encoder.layers[3].self_attn.q_proj, eqxtl.LoRALinear)
    else:
        stem = adapted.backbone.embedder.embedder.convolution
        assert isinstance(stem, eqxtl.LoRAConv2d)  # 7x7 conv: A 7x7 to r, B 1x1
        assert stem.lora_a.shape == (3, 3, 7, 7) and stem.lora_b.shape == (8, 3, 1, 1)

    adapted = perturb(adapted, 1)
    want = outputs(adapted, state, x)
    assert max_diff(want, before) > 1e-2  # the adapters do something
    merged = eqxtl.merge_lora(adapted)
    assert jax.tree.structure(merged) == jax.tree.structure(model)  # a plain model again
    assert rel_diff(outputs(merged, state, x), want) <= MERGE_RTOL

    eqxtl.save_pretrained(merged, state, tmp_path)
    again, again_state = eqxtl.from_pretrained(tmp_path, keep_head=True)
    assert rel_diff(outputs(again, again_state, x), want) <= MERGE_RTOL

    restored = eqxtl.unmerge_lora(merged, adapted)
    assert jax.tree.structure(restored) == jax.tree.structure(adapted)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(adapted), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    with pytest.raises(eqxtl.AdapterError, match="no LoRA/DoRA adapters"):
        eqxtl.merge_lora(merged)  # merging twice
    with pytest.raises(eqxtl.AdapterError, match="merge_lora"):
        eqxtl.save_pretrained(adapted, state, tmp_path / "adapted")
    with pytest.raises(eqxtl.AdapterError, match="still has adapters"):
        eqxtl.unmerge_lora(adapted, adapted)


@eqx.filter_jit
def keyed_outputs(model, state, x, keys):
    return eqxtl.batched(model)(x, state, keys)[0]


def test_dropout_only_with_a_key():
    model, state = classifier("clip")
    x = jnp.asarray(batch(0)["image"])
    adapted = perturb(eqxtl.lora(model, QV, rank=4, dropout=0.5, key=jax.random.key(0)), 3)
    no_dropout = eqxtl.lora(model, QV, rank=4, key=jax.random.key(0))
    no_dropout = perturb(no_dropout, 3)
    keys = jax.random.split(jax.random.key(1), x.shape[0])
    reference = keyed_outputs(no_dropout, state, x, keys)  # a key, but rate 0
    assert jnp.array_equal(keyed_outputs(adapted, state, x, None), reference)  # no key
    assert max_diff(keyed_outputs(adapted, state, x, keys), reference) > 1e-3
    # ResNet's convolutions get no key: dropout there would silently do nothing
    resnet, _ = classifier("resnet")
    with pytest.raises(eqxtl.AdapterError, match="dropout"):
        eqxtl.lora(resnet, r".*convolution", dropout=0.1, key=jax.random.key(0))


def test_bad_input():
    model, _ = classifier("clip")
    with pytest.raises(eqxtl.RuleError, match="q_proj") as e:
        eqxtl.lora(model, r".*\.q_prj", key=jax.random.key(0))
    assert "matches no linear" in str(e.value)
    with pytest.raises(eqxtl.RuleError, match="no linear"):
        eqxtl.lora(model, r".*layer_norm1", key=jax.random.key(0))  # a LayerNorm
    for rank in (0, -1, 65):  # tiny CLIP: hidden 64
        with pytest.raises(eqxtl.AdapterError, match="rank"):
            eqxtl.lora(model, QV, rank=rank, key=jax.random.key(0))
    adapted = eqxtl.lora(model, QV, rank=2, key=jax.random.key(0))
    with pytest.raises(eqxtl.AdapterError, match="already have adapters"):
        eqxtl.lora(adapted, r".*q_proj", key=jax.random.key(0))
    with pytest.raises(eqxtl.AdapterError, match="no LoRA/DoRA adapters"):
        eqxtl.lora_spec(model)


# --------------------------------------------------------------------------- training


def test_lora_spec_param_groups_and_training():
    model, state = classifier("clip")
    adapted = eqxtl.lora(model, QV, rank=4, key=jax.random.key(0))
    spec = eqxtl.lora_spec(adapted, "head")
    on = trained(adapted, spec)
    assert on == {p for p in eqxtl.paths(adapted) if ".lora_" in p or p.startswith("head.")}
    text = eqxtl.summary(adapted, spec, print_it=False)
    assert "backbone.encoder.layers.*.self_attn.q_proj.lora_*" in text

    # adapters with their own learning rate; the rest frozen
    spec2, optimizer = eqxtl.param_groups(
        adapted, [(".*lora_.*", optax.adam(1e-2)), ("head", optax.adam(1e-3)), (".*", None)]
    )
    assert jax.tree.all(jax.tree.map(lambda a, b: a == b, spec, spec2))
    step = eqxtl.make_step(eqxtl.task_loss(), optimizer, spec2, donate=False)
    opt_state = optimizer.init(eqx.filter(adapted, spec2))
    model = adapted
    for i in range(2):
        model, state, opt_state, _ = step(model, state, opt_state, batch(i), jax.random.key(i))
    for path, before, after in zip(
        eqxtl.paths(adapted), jax.tree.leaves(adapted), jax.tree.leaves(model), strict=True
    ):
        moved = not jnp.array_equal(before, after)
        assert moved == (path in on), path  # frozen base weights are bit-identical


def test_bitfit_and_ln_tuning_recipes():
    """BitFit (biases + head) and LN-tuning (LayerNorm/BatchNorm affine + head) are rules."""
    model, _ = classifier("clip")
    bitfit = eqxtl.trainable(model, r".*\.bias", "head")
    on = trained(model, bitfit)
    assert on and all(p.endswith(".bias") or p.startswith("head.") for p in on)
    assert "backbone.encoder.layers.0.self_attn.q_proj.bias" in on
    assert "backbone.encoder.layers.0.layer_norm1.bias" in on

    ln = eqxtl.trainable(model, LayerNorm, "head")
    on = trained(model, ln)
    norms = {p for p in eqxtl.paths(model) if re.search(r"lay(er_?)?r?norm", p)}
    assert on == norms | {"head.weight", "head.bias"}

    resnet, _ = classifier("resnet")
    bn = eqxtl.trainable(resnet, eqxtl.BatchNorm, "head")
    on = trained(resnet, bn)
    assert on == {p for p in eqxtl.paths(resnet) if ".normalization." in p or p.startswith("head.")}


def test_lora_step_computes_no_frozen_weight_gradients():
    """XLA's cost analysis: a full step is ~3 forwards (forward, input gradients, weight
    gradients); LoRA on every linear of the encoder drops the weight gradients of the
    frozen base weights, ~2 forwards. Were they computed (and thrown away), LoRA would cost
    at least the full step."""
    model, state = classifier("clip")
    targets = r"backbone\.encoder\..*"  # every linear of every block
    adapted = eqxtl.lora(model, targets, rank=2, key=jax.random.key(0))
    b = batch(0, size=8)
    key = jax.random.key(0)

    def step_flops(model, spec):
        optimizer = optax.adam(1e-3)
        step = eqxtl.make_step(eqxtl.task_loss(), optimizer, spec, donate=False)
        opt_state = optimizer.init(eqx.filter(model, spec))
        trainable, frozen = eqx.partition(model, spec)
        return _flops(
            step.compiled.lower((frozen, state, b, key, None), trainable, opt_state).compile()
        )

    full = step_flops(model, eqxtl.everything(model))
    lora = step_flops(adapted, eqxtl.lora_spec(adapted, "head"))
    print(f"step FLOPs: full {full:.3g}, LoRA {lora:.3g} ({lora / full:.2f}x)")
    assert lora < 0.8 * full, (lora, full)


# --------------------------------------------------------------------------- PEFT files


def test_peft_file_errors(tmp_path):
    model, _ = classifier("resnet")
    adapted = perturb(eqxtl.lora(model, r".*convolution", rank=2, key=jax.random.key(0)), 0)
    eqxtl.save_adapter(adapted, tmp_path / "a", modules_to_save=["head"])
    with pytest.raises(eqxtl.AdapterError, match="already has adapters"):
        eqxtl.load_adapter(adapted, tmp_path / "a")
    # another base: same architecture, other widths -> every mismatch listed
    config = dataclasses.replace(TINY_RESNET, hidden_sizes=(8, 16, 32, 48))
    wider = checkpoint.fill(
        checkpoint.skeleton(R.RESNET, config), random_tensors(R.RESNET, config)
    )[0]
    other = eqxtl.Classifier(wider, 3, key=jax.random.key(0))
    with pytest.raises(eqxtl.CheckpointError, match="mismatches") as e:
        eqxtl.load_adapter(other, tmp_path / "a")
    assert "4 mismatches" in str(e.value) and "classifier.1.weight" in str(e.value)
    assert "encoder.stages.3.layers.0.shortcut.convolution" in str(e.value)
    with pytest.raises(eqxtl.CheckpointError, match="adapter_config.json"):
        eqxtl.load_adapter(model, tmp_path)
    # a right file fits the plain model it came from
    loaded = eqxtl.load_adapter(model, tmp_path / "a")
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(adapted), strict=True):
        assert jnp.array_equal(a, b)


def _torch_perturb(peft_model, seed: int):
    """Non-zero PEFT adapters (B random, magnitudes jittered) and a changed saved module."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif "lora_magnitude" in name or "modules_to_save" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))


def test_clip_b32_adapter_to_peft(b32, tmp_path):  # noqa: F811
    """eqxtl -> PEFT: LoRA r=8 on q,v of every block (+ visual_projection saved whole)."""
    directory, images, _, embeds = b32
    backbone, state = load_clip(directory)
    adapted = perturb(eqxtl.lora(backbone, QV, rank=8, alpha=16, key=jax.random.key(0)), 0)
    adapted = eqx.tree_at(
        lambda m: m.visual_projection.weight, adapted, adapted.visual_projection.weight * 1.1
    )
    ours = adapted.project(outputs(adapted, state, jnp.asarray(images)))
    eqxtl.save_adapter(adapted, tmp_path, modules_to_save=["visual_projection"])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16
    # a regex (PEFT full-matches a string): each of the 24 layers, with or without vision_model.
    assert len(config["target_modules"].split("|")) == 24

    base = transformers.CLIPVisionModelWithProjection.from_pretrained(directory).eval()
    theirs_model = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        theirs = theirs_model(pixel_values=torch.from_numpy(images)).image_embeds.numpy()
    err, moved = max_diff(ours, theirs), max_diff(theirs, embeds)
    print(
        f"CLIP-B/32 eqxtl->PEFT: max |Δ| image_embeds {err:.2e} (adapters moved them {moved:.2f})"
    )
    assert moved > 100 * TOL and err <= TOL


def test_clip_b32_adapter_from_peft(b32, tmp_path):  # noqa: F811
    """PEFT -> eqxtl: DoRA + rsLoRA, r=8, alpha=16 on q,v, visual_projection saved."""
    directory, images, _, embeds = b32
    base = transformers.CLIPVisionModelWithProjection.from_pretrained(directory).eval()
    config = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        use_dora=True,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["visual_projection"],
    )
    peft_model = peft.get_peft_model(base, config)
    _torch_perturb(peft_model, 0)
    peft_model.eval().save_pretrained(tmp_path)
    with torch.no_grad():
        theirs = peft_model(pixel_values=torch.from_numpy(images)).image_embeds.numpy()

    backbone, state = load_clip(directory)
    adapted = eqxtl.load_adapter(backbone, tmp_path)
    q = adapted.encoder.layers[0].self_attn.q_proj
    assert q.lora_magnitude is not None and q.rslora and q.scale == 16 / np.sqrt(8)
    ours = adapted.project(outputs(adapted, state, jnp.asarray(images)))
    err, moved = max_diff(ours, theirs), max_diff(theirs, embeds)
    print(
        f"CLIP-B/32 PEFT->eqxtl: max |Δ| image_embeds {err:.2e} (adapters moved them {moved:.2f})"
    )
    assert moved > 100 * TOL and err <= TOL


@pytest.fixture(scope="module")
def resnet50(tmp_path_factory, images):  # noqa: F811
    return _real("resnet-50", tmp_path_factory, images)


def test_resnet50_adapter_to_peft(resnet50, images, tmp_path):  # noqa: F811
    """eqxtl -> PEFT: DoRA r=8 on the 7x7 stem and every convolution of the last stage
    (3x3, 1x1, shortcut) + the classifier saved whole."""
    model, state = eqxtl.from_pretrained(resnet50["dirs"]["cls"], keep_head=True)
    targets = r".*(embedder|stages\.3\..*)\.convolution"
    adapted = perturb(
        eqxtl.lora(model, targets, rank=8, alpha=4, dora=True, key=jax.random.key(0)), 0
    )
    adapted = eqx.tree_at(lambda m: m.head.bias, adapted, adapted.head.bias + 0.5)
    ours = outputs(adapted, state, jnp.asarray(images))
    eqxtl.save_adapter(adapted, tmp_path, modules_to_save=["head"])

    base = copy.deepcopy(resnet50["model"]).eval()
    theirs_model = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        theirs = theirs_model(pixel_values=torch.from_numpy(images)).logits.numpy()
    err, moved = max_diff(ours, theirs), max_diff(theirs, resnet50["logits"])
    print(f"ResNet-50 eqxtl->PEFT: max |Δ| logits {err:.2e} (adapters moved them {moved:.2f})")
    assert moved > 100 * TOL and err <= TOL


def test_resnet50_adapter_from_peft(resnet50, images, tmp_path):  # noqa: F811
    """PEFT -> eqxtl: LoRA r=4 (r=8 on the 3x3s by rank_pattern), alpha 8, on every
    convolution of the first two stages, classifier in modules_to_save."""
    base = copy.deepcopy(resnet50["model"]).eval()
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        rank_pattern={r"layer\.1\.convolution": 8},
        target_modules=r".*stages\.[01]\..*convolution",
        modules_to_save=["classifier"],
    )
    peft_model = peft.get_peft_model(base, config)
    _torch_perturb(peft_model, 1)
    peft_model.eval().save_pretrained(tmp_path)
    with torch.no_grad():
        theirs = peft_model(pixel_values=torch.from_numpy(images)).logits.numpy()

    model, state = eqxtl.from_pretrained(resnet50["dirs"]["cls"], keep_head=True)
    adapted = eqxtl.load_adapter(model, tmp_path)
    block = adapted.backbone.encoder.stages[0].layers[0]
    assert block.layer[1].convolution.rank == 8 and block.layer[0].convolution.rank == 4
    ours = outputs(adapted, state, jnp.asarray(images))
    err, moved = max_diff(ours, theirs), max_diff(theirs, resnet50["logits"])
    print(f"ResNet-50 PEFT->eqxtl: max |Δ| logits {err:.2e} (adapters moved them {moved:.2f})")
    assert moved > 100 * TOL and err <= TOL


def test_finetune_rps_lora(tmp_path, capsys):
    """examples/finetune_rps.py --lora: adapters + head train; PEFT folder and merged model."""
    import tensorflow_datasets as tfds

    from tests.test_fit import _example

    backbone, state = tiny_model("clip")
    eqxtl.save_pretrained(backbone, state, tmp_path / "weights")
    argv = [
        "--weights", str(tmp_path / "weights"), "--batch-size", "8", "--eval-every", "3",
        "--out", str(tmp_path / "out"), "--lora", "2",
    ]  # fmt: skip
    with tfds.testing.mock_data(num_examples=20):
        result = _example().main(argv)
    assert "backbone.encoder.layers.*.self_attn.q_proj.lora_*" in capsys.readouterr().out
    lora_b = result.model.backbone.encoder.layers[0].self_attn.v_proj.lora_b
    assert float(jnp.max(jnp.abs(lora_b))) > 0  # the adapters trained
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["modules_to_save"] == ["classifier"]
    merged, _ = eqxtl.from_pretrained(tmp_path / "out" / "merged", keep_head=True)
    x = jnp.asarray(batch(0)["image"])
    want = outputs(result.model, state, x)
    assert rel_diff(outputs(merged, state, x), want) <= MERGE_RTOL
    # fit's checkpoints of an adapted model: the merged model + the PEFT adapter beside it
    best = tmp_path / "out" / "best"
    again = eqxtl.load_adapter(eqxtl.Classifier(backbone, 3, zero_init=True), best)
    assert rel_diff(outputs(again, state, x), outputs(result.model, state, x)) <= 1e-6
    assert (best / "model.safetensors").is_file()
