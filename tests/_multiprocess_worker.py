"""One process of a multi-process ``fit`` (tests/test_fit_multiprocess.py).

    python -m tests._multiprocess_worker PROCESS_ID NUM_PROCESSES PORT OUT_DIR STEPS [N_TRAIN]

With NUM_PROCESSES 1 it runs without ``jax.distributed`` (the reference). Prints one JSON
line: the final weights, the step and the history.
"""

import json
import sys

import jax

pid, count, port, out_dir, steps = sys.argv[1:6]
pid, count, steps = int(pid), int(count), int(steps)
n_train = int(sys.argv[6]) if len(sys.argv) > 6 else 24
if count > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", count, pid, local_device_ids=[0])

import equinox as eqx  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import eqxtl  # noqa: E402
from eqxtl.training import runs  # noqa: E402
from tests._tiny import tiny  # noqa: E402

real_save = runs.RunDir.save


def logged_save(self, *args, **kwargs):  # which process writes checkpoints
    with open(self.path / "saves.log", "a") as f:
        f.write(f"{jax.process_index()}\n")
    return real_save(self, *args, **kwargs)


runs.RunDir.save = logged_save


def colour_task(n, seed, size=40):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    images = rng.integers(0, 120, (n, size, size, 3))
    for i, c in enumerate(labels):
        images[i, ..., c] += 120
    return eqxtl.ArraySource(images.astype(np.uint8), labels, ["red", "green", "blue"])


backbone, state = tiny("resnet", 0)
model = eqxtl.Classifier(backbone, 3, key=jax.random.key(1))
# BatchNorm of the last block trains: its batch statistics span both processes' examples
spec = eqxtl.trainable(model, "head", *eqxtl.last_blocks(model, 1))
try:
    p = eqxtl.preprocessing_for(model)
    result = eqxtl.fit(
        model,
        state,
        train_data=eqxtl.Loader(colour_task(n_train, 0), p, 8, shuffle=True, num_workers=0),
        test_data=eqxtl.Loader(colour_task(10, 1), p, 8, num_workers=0),
        phases=[eqxtl.Phase(spec, optax.sgd(0.05), steps=steps)],
        checkpoint=None if out_dir == "-" else eqxtl.Checkpoint(out_dir),
        runtime=eqxtl.Runtime(eval_every=2, progress=False),
    )
except eqxtl.EqxtlError as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
    sys.exit(3)
leaves = jax.tree.leaves(eqx.filter((result.model, result.state), eqx.is_array))
params = [np.asarray(eqxtl.training.parallel.local(x)).tolist() for x in leaves]
print(json.dumps({"step": result.step, "history": result.history, "params": params}))
