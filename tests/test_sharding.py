"""FSDP sharding (``make_mesh``, ``shard``, ``make_step(mesh=...)``) and gradient
accumulation (``make_step(accumulate=k)``).

The 8-device checks run in ONE subprocess with 8 virtual CPU devices
(``--xla_force_host_platform_device_count=8``): a ViT with hidden size 256, so that its
attention and MLP weights have at least 2**16 elements and are split 8 ways. The rest run
here on one device."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import eqxtl
from eqxtl.io import checkpoint
from eqxtl.models import vit
from tests._tiny import TINY_VIT, random_tensors

ROOT = Path(__file__).resolve().parents[1]

_WORKER = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import dataclasses, json, sys, warnings
    import equinox as eqx, jax, numpy as np, optax
    from jax.sharding import PartitionSpec as P
    sys.path.insert(0, sys.argv[1])
    import eqxtl
    from eqxtl.io import checkpoint
    from eqxtl.models import vit
    from tests._tiny import TINY_VIT, random_tensors

    assert jax.device_count() == 8
    cfg = dataclasses.replace(TINY_VIT, hidden_size=256, intermediate_size=512,
                              num_attention_heads=4, num_hidden_layers=1)
    backbone, state = checkpoint.fill(checkpoint.skeleton(vit.VIT, cfg),
                                      random_tensors(vit.VIT, cfg, 0))
    model = eqxtl.Classifier(backbone, 10, key=jax.random.key(1))
    spec = jax.tree.map(eqx.is_inexact_array, model)  # full fine-tuning
    optimizer = optax.sgd(0.1, momentum=0.9)  # a momentum per parameter, of its shape
    rng = np.random.default_rng(0)
    batches = [
        {"image": rng.normal(size=(16, 3, 16, 16)).astype(np.float32),
         "label": rng.integers(0, 10, 16).astype(np.int32)}
        for _ in range(3)
    ]
    test = eqxtl.ArraySource(rng.integers(0, 255, (20, 16, 16, 3)).astype(np.uint8),
                             rng.integers(0, 10, 20), [str(i) for i in range(10)])
    arrays = lambda t: jax.tree.leaves(eqx.filter(t, eqx.is_array))
    out = {}
    for name, mesh in (("single", None), ("fsdp", eqxtl.make_mesh(fsdp=8))):
        m, s = model, state
        o = optimizer.init(eqx.filter(m, spec))
        if mesh is not None:
            m, s, o = eqxtl.shard((m, s, o), mesh)
            before = [str(x.sharding.spec) for x in arrays((m, o))]
        step = eqxtl.make_step(eqxtl.task_loss(), optimizer, spec, mesh=mesh)
        losses = []
        for b in batches:
            m, s, o, metrics = step(m, s, o, b)
            losses.append(float(metrics["loss"]))
        out[name] = {"losses": losses, "params": [np.asarray(x).tolist() for x in arrays(m)],
                     "eval": eqxtl.evaluate(m, s, test, batch_size=8, mesh=mesh)}
        if mesh is not None:
            leaves = arrays((m, o))
            dev = jax.devices()[3]
            out[name]["before"] = before
            out[name]["after"] = [str(x.sharding.spec) for x in leaves]
            out[name]["mesh"] = [dict(x.sharding.mesh.shape) for x in leaves]
            out[name]["per_device"] = sum(
                sh.data.nbytes for x in leaves for sh in x.addressable_shards if sh.device == dev)
            out[name]["total"] = sum(x.nbytes for x in leaves)
            out[name]["small"] = sum(x.nbytes for x in leaves if x.size < 2**16)
            paths = eqxtl.paths(o)
            out[name]["opt_specs"] = {p: str(x.sharding.spec) for p, x in zip(paths, arrays(o))}
            out[name]["specs"] = {p: str(x.sharding.spec) for p, x in
                                  zip(eqxtl.paths(m), arrays(m))}

    # fit through Runtime(mesh=..., accumulate=...) against fit on one device
    train = eqxtl.ArraySource(rng.integers(0, 255, (16, 16, 16, 3)).astype(np.uint8),
                              rng.integers(0, 10, 16), [str(i) for i in range(10)])
    for name, rt in (("fit_single", eqxtl.Runtime(mesh=None, progress=False)),
                     ("fit_fsdp", eqxtl.Runtime(mesh=eqxtl.make_mesh(fsdp=8), accumulate=2,
                                                progress=False))):
        r = eqxtl.fit(model, state, optimizer, spec, eqxtl.Loader(
            train, eqxtl.preprocessing_for(model), 16, num_workers=0), runtime=rt)
        out[name] = {"params": [np.asarray(x).tolist() for x in arrays(r.model)],
                     "loss": r.history[-1]["train_loss"],
                     "specs": sorted({str(getattr(x.sharding, "spec", None))
                                      for x in arrays(r.opt_state)})}

    mesh = eqxtl.make_mesh(data=2, fsdp=4)
    rules = [(r"backbone\\.encoder\\.layer\\.0\\.intermediate\\.dense\\.weight", P(None, "fsdp"))]
    m, o = eqxtl.shard((model, optimizer.init(eqx.filter(model, spec))), mesh, rules)
    ruled = {p: str(x.sharding.spec) for p, x in zip(eqxtl.paths((m, o)), arrays((m, o)))}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        odd = eqxtl.shard({"odd": np.zeros((257, 257), np.float32)}, eqxtl.make_mesh(fsdp=8))
    out["rules"] = {"ruled": ruled, "warnings": [str(w.message) for w in caught],
                    "odd": str(odd["odd"].sharding.spec), "mesh": dict(mesh.shape)}
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def eight_devices() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = subprocess.run(
        [sys.executable, "-c", _WORKER, str(ROOT)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_fsdp_8_steps_and_evaluation_equal_one_device(eight_devices):
    single, fsdp = eight_devices["single"], eight_devices["fsdp"]
    np.testing.assert_allclose(fsdp["losses"], single["losses"], rtol=1e-5)
    for a, b in zip(fsdp["params"], single["params"], strict=True):
        a, b = np.array(a), np.array(b)
        assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b)) + 1e-7
    assert fsdp["eval"]["count"] == single["eval"]["count"] == 20
    assert fsdp["eval"]["accuracy"] == single["eval"]["accuracy"]
    np.testing.assert_allclose(fsdp["eval"]["loss"], single["eval"]["loss"], rtol=1e-5)


def test_fit_on_an_fsdp_mesh_with_accumulation_equals_one_device(eight_devices):
    single, fsdp = eight_devices["fit_single"], eight_devices["fit_fsdp"]
    assert fsdp["loss"] == pytest.approx(single["loss"], rel=1e-5)
    for a, b in zip(fsdp["params"], single["params"], strict=True):
        a, b = np.array(a), np.array(b)
        assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b)) + 1e-7
    assert str(P("fsdp")) in fsdp["specs"]  # the optimizer state stays split


def test_fsdp_splits_large_leaves_and_keeps_the_shardings(eight_devices):
    fsdp = eight_devices["fsdp"]
    assert fsdp["after"] == fsdp["before"]  # out shardings = in shardings, every step
    assert all(shape == {"data": 1, "fsdp": 8} for shape in fsdp["mesh"])
    specs = fsdp["specs"]
    # the largest axis the fsdp size divides: (512, 256) on axis 0, (256, 512) on axis 1
    assert specs["backbone.encoder.layer.0.intermediate.dense.weight"] == str(P("fsdp"))
    assert specs["backbone.encoder.layer.0.output.dense.weight"] == str(P(None, "fsdp"))
    assert specs["backbone.encoder.layer.0.attention.attention.query.weight"] == str(P("fsdp"))
    assert specs["backbone.encoder.layer.0.output.dense.bias"] == str(P())  # small
    # the momentum of each parameter has its sharding
    for path, spec in specs.items():
        assert fsdp["opt_specs"]["0.trace." + path] == spec, path
    # per device: an eighth of the large leaves plus every small one
    bound = 1.05 * fsdp["total"] / 8 + fsdp["small"]
    assert fsdp["per_device"] <= bound, (fsdp["per_device"], bound)
    assert fsdp["per_device"] < fsdp["total"] / 4


def test_rules_override_and_reach_the_optimizer_state(eight_devices):
    rules = eight_devices["rules"]
    assert rules["mesh"] == {"data": 2, "fsdp": 4}
    ruled = rules["ruled"]
    path = "backbone.encoder.layer.0.intermediate.dense.weight"
    assert ruled["0." + path] == ruled["1.0.trace." + path] == str(P(None, "fsdp"))
    other = "backbone.encoder.layer.0.attention.attention.query.weight"  # the default
    assert ruled["0." + other] == ruled["1.0.trace." + other] == str(P("fsdp"))
    # a large leaf no axis of which 8 divides: replicated, with a warning naming it
    assert rules["odd"] == str(P())
    (message,) = rules["warnings"]
    assert "odd [257, 257]" in message and "fsdp=8" in message


# ------------------------------------------------------------- in process, one device


def test_make_mesh_bad_sizes():
    d = jax.devices()[0]
    with pytest.raises(eqxtl.EqxtlError, match=r"data=2, fsdp=4\) needs 8 devices.*only 1"):
        eqxtl.make_mesh(data=2, fsdp=4)
    with pytest.raises(eqxtl.EqxtlError, match=r"fsdp=2\) does not divide the 1 devices"):
        eqxtl.make_mesh(fsdp=2)
    with pytest.raises(eqxtl.EqxtlError, match=r"data=4, fsdp=1\) covers 4 of the 6"):
        eqxtl.make_mesh(data=4, devices=[d] * 6)
    for bad in (0, -2, 1.5):
        with pytest.raises(eqxtl.EqxtlError, match=r"make_mesh\(fsdp=\.\.\.\)"):
            eqxtl.make_mesh(fsdp=bad)
    mesh = eqxtl.make_mesh()
    assert mesh.axis_names == ("data", "fsdp") and dict(mesh.shape) == {"data": 1, "fsdp": 1}


def test_shard_rule_that_does_not_fit_the_leaf():
    mesh = eqxtl.make_mesh()
    tree = {"head": {"weight": np.zeros((4, 8), np.float32)}}
    with pytest.raises(eqxtl.RuleError, match=r"'head\\\\.weight'.*head\.weight \[4, 8\].*3 axes"):
        eqxtl.shard(tree, mesh, [(r"head\.weight", P(None, None, "fsdp"))])
    with pytest.raises(eqxtl.RuleError, match=r"no axis 'model'"):
        eqxtl.shard(tree, mesh, [(r".*weight", P("model"))])
    with pytest.raises(eqxtl.RuleError, match="PartitionSpec"):
        eqxtl.shard(tree, mesh, [(r".*weight", ("fsdp",))])
    placed = eqxtl.shard(tree, mesh, [(r"weight", P(None, "fsdp"))])  # a dotted suffix
    assert placed["head"]["weight"].sharding.spec == P(None, "fsdp")


def _vit(image_size=16, patch_size=8):
    cfg = dataclasses.replace(
        TINY_VIT, image_size=image_size, patch_size=patch_size, num_hidden_layers=1
    )
    backbone, state = checkpoint.fill(
        checkpoint.skeleton(vit.VIT, cfg), random_tensors(vit.VIT, cfg, 0)
    )
    model = eqxtl.Classifier(backbone, 5, key=jax.random.key(1))
    return model, state, jax.tree.map(eqx.is_inexact_array, model)


def test_accumulate_equals_one_step_and_cuts_activation_memory():
    model, state, spec = _vit(32, 4)  # 65 tokens: activations dominate the step's memory
    optimizer = optax.sgd(0.1)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(32, 3, 32, 32)).astype(np.float32),
        "label": rng.integers(0, 5, 32).astype(np.int32),
        "mask": np.arange(32) < 27,  # a padded last batch: the counts weigh the micro-batches
    }
    opt_state = optimizer.init(eqx.filter(model, spec))
    trainable, frozen = eqx.partition(model, spec)
    out = {}
    for k in (1, 4):
        step = eqxtl.make_step(eqxtl.task_loss(), optimizer, spec, accumulate=k, donate=False)
        compiled = step.compiled.lower((frozen, state, batch, None, None), trainable, opt_state)
        compiled = compiled.compile()
        new, _, _, metrics = compiled((frozen, state, batch, None, None), trainable, opt_state)
        temp = compiled.compiled.memory_analysis().temp_size_in_bytes
        out[k] = (temp, float(metrics["loss"]), metrics["count"], jax.tree.leaves(new))
    (temp1, loss1, count1, new1), (temp4, loss4, count4, new4) = out[1], out[4]
    assert temp4 < 0.6 * temp1, (temp4, temp1)
    assert float(count1) == float(count4) == 27
    assert loss4 == pytest.approx(loss1, rel=1e-5)
    moved = 0
    for a, b, old in zip(new4, new1, jax.tree.leaves(trainable), strict=True):
        a, b, old = np.asarray(a), np.asarray(b), np.asarray(old)
        moved += int(np.any(b != old))
        assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b)) + 1e-7
    assert moved > len(new1) // 2


def test_accumulate_that_does_not_divide_the_batch():
    model, state, spec = _vit()
    optimizer = optax.sgd(0.1)
    step = eqxtl.make_step(eqxtl.task_loss(), optimizer, spec, accumulate=3)
    batch = {"image": np.zeros((8, 3, 16, 16), np.float32), "label": np.zeros(8, np.int32)}
    opt_state = optimizer.init(eqx.filter(model, spec))
    with pytest.raises(eqxtl.TrainingError, match=r"accumulate=3\) cannot cut a batch of 8"):
        step(model, state, opt_state, batch)
    with pytest.raises(eqxtl.TrainingError, match=r"make_step\(accumulate=\.\.\.\)"):
        eqxtl.make_step(eqxtl.task_loss(), optimizer, spec, accumulate=0)
    with pytest.raises(eqxtl.TrainingError, match=r"Runtime\(accumulate=\.\.\.\)"):
        eqxtl.Runtime(accumulate=-1)
    rng = np.random.default_rng(0)
    source = eqxtl.ArraySource(
        rng.integers(0, 255, (10, 16, 16, 3)).astype(np.uint8), rng.integers(0, 5, 10)
    )
    runtime = eqxtl.Runtime(accumulate=3, mesh=None, progress=False)
    with pytest.raises(eqxtl.TrainingError, match=r"accumulate=3\) cannot cut batches of 32"):
        eqxtl.fit(model, state, optimizer, spec, source, runtime=runtime)
