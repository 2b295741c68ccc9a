"""Shared helpers for the ViT-family tests (ViT, DINOv2): perturbed transformers reference
models, relative errors, and the generic backbone checks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

import eqxtl


def perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Norm weights 1 + 0.1N, norm biases 0.1N, layer scales 0.5 + 0.1N, cls / register
    tokens N(0, 1): a random init where every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "lambda1" in name:
                p.copy_(0.5 + 0.1 * noise)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "cls_token" in name or "register_tokens" in name:
                p.copy_(noise)
    return model.eval()


def rel_err(got, want) -> float:
    """max |got - want| / max |want|."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def same_tree(a, b) -> bool:
    return jax.tree.all(jax.tree.map(jnp.array_equal, a, b))


def check_learns(backbone, state, tmp_path) -> float:
    """The quickstart recipe: frozen backbone + new head, ``eqxtl.fit`` on a separable
    colour task (tests/test_fit.py's); returns the test accuracy."""
    from tests.test_fit import colour_task

    model = eqxtl.Classifier(backbone, 3, key=jax.random.key(0))
    result = eqxtl.fit(
        model,
        state,
        optax.adam(1e-2),
        eqxtl.trainable(model, "head"),
        eqxtl.Loader(colour_task(96, seed=0), eqxtl.preprocessing_for(model), 16, shuffle=True),
        test_data=eqxtl.Loader(colour_task(48, seed=1), eqxtl.preprocessing_for(model), 16),
        epochs=8,
        checkpoint=eqxtl.Checkpoint(tmp_path),
        runtime=eqxtl.Runtime(progress=False),
    )
    return result.final["test_accuracy"]
