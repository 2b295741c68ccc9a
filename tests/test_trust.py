"""Issue 25 ("Trust on the new surface") in training, data and the CLI: bad hyperparameters
refused where they are given, labels of the wrong shape refused, a single class refused,
resumes that say what they resume, ties that go to the later checkpoint, interrupts that
keep the run, image formats PIL reads."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from PIL import Image

import eqxtl
from eqxtl import cli
from tests._tiny import tiny
from tests.test_fit_faults import Batches

IMAGE = 32
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def parts():
    return tiny("resnet", 0)


def batches(n, *, classes=2, size=4, seed=0, label=None):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        image = rng.normal(size=(size, 3, IMAGE, IMAGE)).astype(np.float32)
        y = rng.integers(0, classes, size).astype(np.int32) if label is None else label(rng)
        out.append({"image": image, "label": y, "mask": np.ones(size, bool)})
    return Batches(out)


def head(parts, classes=2):
    backbone, state = parts
    model = eqxtl.Classifier(backbone, classes, key=jax.random.key(0))
    return model, state, eqxtl.trainable(model, "head")


# ---------------------------------------------------------------- 1. counts


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epochs": -1},
        {"epochs": 0},
        {"steps": 0},
        {"steps": -3},
        {"epochs": 1.5},
        {"steps": math.nan},
        {"epochs": "2"},
        {"steps": True},
    ],  # fmt: skip
)
def test_phase_durations_must_be_positive_integers(parts, kwargs):
    model, _, spec = head(parts)
    name = next(iter(kwargs))
    with pytest.raises(eqxtl.TrainingError, match=rf"Phase\({name}=\.\.\.\) must be an integer"):
        eqxtl.Phase(spec, optax.adam(1e-3), **kwargs)


def test_phase_durations_accept_numpy_and_integral_floats(parts):
    model, _, spec = head(parts)
    phase = eqxtl.Phase(spec, optax.adam(1e-3), epochs=np.int64(2), steps=3.0)
    assert (phase.epochs, phase.steps) == (2, 3) and type(phase.steps) is int


def test_fit_epochs_and_empty_phases_are_refused_by_name(parts):
    model, state, spec = head(parts)
    data = batches(1)
    with pytest.raises(eqxtl.TrainingError, match=r"fit\(epochs=\.\.\.\)"):
        eqxtl.fit(model, state, optax.adam(1e-3), spec, data, epochs=0)
    with pytest.raises(eqxtl.TrainingError, match=r"phases=\[\]\) has nothing to run"):
        eqxtl.fit(model, state, train_data=data, phases=[])
    with pytest.raises(eqxtl.TrainingError, match=r"takes a list of eqxtl.Phase.*tuple"):
        eqxtl.fit(model, state, train_data=data, phases=[(spec, optax.adam(1e-3))])


@pytest.mark.parametrize("bad", [0, -1, 2.5, math.nan])
def test_batch_size_is_checked_where_it_is_given(parts, bad):
    model, state, _ = head(parts)
    source = eqxtl.ArraySource(np.zeros((3, 8, 8, 3), np.uint8), [0, 1, 0])
    pre = eqxtl.preprocessing_for(model)
    with pytest.raises(eqxtl.DataError, match=r"Loader\(batch_size=\.\.\.\)"):
        eqxtl.Loader(source, pre, bad)
    with pytest.raises(eqxtl.DataError, match=r"predict\(batch_size=\.\.\.\)"):
        eqxtl.predict(model, state, np.zeros((2, 8, 8, 3), np.uint8), batch_size=bad)
    with pytest.raises(eqxtl.DataError, match=r"evaluate\(batch_size=\.\.\.\)"):
        eqxtl.evaluate(model, state, source, batch_size=bad)
    with pytest.raises(eqxtl.EqxtlError, match=r"wise_ft\(batch_size=\.\.\.\)"):
        eqxtl.wise_ft(model, model, [0.5], source, batch_size=bad, states=(state, state))
    with pytest.raises(eqxtl.DataError, match=r"extract_features\(batch_size=\.\.\.\)"):
        eqxtl.extract_features(model, state, source, batch_size=bad)


def test_loader_and_grain_worker_counts(parts):
    model, _, _ = head(parts)
    source = eqxtl.ArraySource(np.zeros((4, 8, 8, 3), np.uint8), [0, 1, 0, 1])
    pre = eqxtl.preprocessing_for(model)
    with pytest.raises(eqxtl.DataError, match=r"Loader\(num_workers=\.\.\.\)"):
        eqxtl.Loader(source, pre, 2, num_workers=-1)
    with pytest.raises(eqxtl.DataError, match=r"Loader\(prefetch=\.\.\.\)"):
        eqxtl.Loader(source, pre, 2, prefetch=0)
    loader = eqxtl.Loader(source, pre, 2)
    with pytest.raises(eqxtl.DataError, match=r"GrainLoader\(num_workers=\.\.\.\)"):
        eqxtl.GrainLoader(loader, num_workers=-2)
    with pytest.raises(eqxtl.DataError, match=r"GrainLoader\(index=1\) must be < count"):
        eqxtl.GrainLoader(loader, index=1, count=1)
    with pytest.raises(eqxtl.DataError, match=r"takes an eqxtl.Loader"):
        eqxtl.GrainLoader(source)


def test_wise_ft_alphas_are_finite_numbers(parts):
    model, state, _ = head(parts)
    source = eqxtl.ArraySource(np.zeros((2, 8, 8, 3), np.uint8), [0, 1])
    for bad in (math.nan, "0.5", math.inf):
        with pytest.raises(eqxtl.EqxtlError, match=r"wise_ft\(alphas=\.\.\.\): each alpha"):
            eqxtl.wise_ft(model, model, [0.0, bad], source, states=(state, state))


def test_wise_ft_on_batchnorm_models_asks_for_their_states(parts):
    model, _, _ = head(parts)  # ResNet: BatchNorm statistics live in the state
    source = eqxtl.ArraySource(np.zeros((2, 8, 8, 3), np.uint8), [0, 1])
    with pytest.raises(eqxtl.EqxtlError, match=r"states=\(zero_shot_state, fine_tuned_state\)"):
        eqxtl.wise_ft(model, model, [0.5], source)


def test_a_class_named_twice_is_refused(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "0.png")
    with pytest.raises(
        eqxtl.DataError, match=r"ImageFolder\(class_names=\.\.\.\): 'cat' appears twice"
    ):
        eqxtl.ImageFolder(tmp_path, class_names=["cat", "cat", "dog"])
    with pytest.raises(eqxtl.DataError, match=r"ArraySource\(class_names=\.\.\.\): 'a' appears"):
        eqxtl.ArraySource(np.zeros((2, 8, 8, 3), np.uint8), [0, 1], ["a", "a"])


# ---------------------------------------------------------------- 2. label shapes


def test_multilabel_refuses_integer_labels_even_when_the_batch_is_num_classes(parts):
    # B == K == 4: integer labels (B,) would broadcast along the class axis
    model, state, spec = head(parts, classes=4)
    data = batches(1, size=4, classes=4)
    with pytest.raises(eqxtl.DataError, match=r"MultiLabel needs labels of shape \(B, K\)"):
        eqxtl.fit(model, state, optax.adam(1e-3), spec, data, task=eqxtl.MultiLabel(),
                  runtime=eqxtl.Runtime(progress=False))  # fmt: skip


def test_regression_refuses_one_target_for_several_outputs(parts):
    model, state, spec = head(parts, classes=3)
    data = batches(1, label=lambda rng: rng.uniform(size=4).astype(np.float32))
    with pytest.raises(eqxtl.DataError, match=r"Regression needs labels of shape"):
        eqxtl.fit(model, state, optax.adam(1e-3), spec, data, task=eqxtl.Regression(),
                  runtime=eqxtl.Runtime(progress=False))  # fmt: skip


def test_classification_refuses_float_or_multi_hot_labels(parts):
    model, state, spec = head(parts, classes=2)
    floats = batches(1, label=lambda rng: rng.uniform(size=4).astype(np.float32))
    with pytest.raises(eqxtl.DataError, match=r"integer class indices"):
        eqxtl.fit(model, state, optax.adam(1e-3), spec, floats,
                  runtime=eqxtl.Runtime(progress=False))  # fmt: skip
    hot = batches(1, label=lambda rng: np.eye(2, dtype=np.int32)[rng.integers(0, 2, 4)])
    with pytest.raises(eqxtl.DataError, match=r"Classification needs labels of shape \(B,\)"):
        eqxtl.evaluate(model, state, hot)


@pytest.mark.parametrize(
    "make",
    [
        lambda: eqxtl.Classification(label_smoothing=1.0),
        lambda: eqxtl.Classification(label_smoothing=math.nan),
        lambda: eqxtl.MultiLabel(threshold=1.5),
    ],  # fmt: skip
)
def test_task_hyperparameters_are_checked(make):
    with pytest.raises(eqxtl.DataError, match=r"must be a finite number"):
        make()


# ---------------------------------------------------------------- 3. one class


def test_fit_refuses_a_one_class_head(parts):
    model, state, spec = head(parts, classes=1)
    with pytest.raises(eqxtl.TrainingError, match=r"at least 2 classes"):
        eqxtl.fit(model, state, optax.adam(1e-3), spec, batches(1, classes=1))


# ---------------------------------------------------------------- 4. resume


def test_resume_with_another_learning_rate_is_refused_and_a_resume_says_its_step(
    parts, tmp_path, capsys
):
    model, state, spec = head(parts)
    data = batches(2)
    out = tmp_path / "run"

    def run(lr, epochs, progress=False):
        return eqxtl.fit(model, state, optax.adam(lr), spec, data, epochs=epochs,
                         checkpoint=eqxtl.Checkpoint(out),
                         runtime=eqxtl.Runtime(progress=progress))  # fmt: skip

    first = run(1e-3, 1)
    assert first.resumed_from is None
    with pytest.raises(
        eqxtl.TrainingError, match=r"optimizer hyperparameters: \[.*-0\.001\] -> \[.*-0\.01\]"
    ):
        run(1e-2, 2)
    capsys.readouterr()
    resumed = run(1e-3, 2, progress=True)
    assert resumed.resumed_from == 2 and resumed.step == 4
    assert f"Resuming the run in {out} from step 2 of 4." in capsys.readouterr().err


def test_another_schedule_peak_is_another_optimizer(parts, tmp_path):
    model, state, spec = head(parts)
    data = batches(2)

    def run(peak, epochs):
        schedule = eqxtl.warmup_cosine(peak, 10, warmup_steps=2)
        return eqxtl.fit(model, state, optax.adam(schedule), spec, data, epochs=epochs,
                         checkpoint=eqxtl.Checkpoint(tmp_path / "run"),
                         runtime=eqxtl.Runtime(progress=False))  # fmt: skip

    run(1e-3, 1)
    with pytest.raises(eqxtl.TrainingError, match=r"optimizer hyperparameters"):
        run(2e-3, 2)


# ---------------------------------------------------------------- 6. best ties


def test_best_keeps_the_later_of_tied_checkpoints(parts, tmp_path):
    model, state, spec = head(parts)
    data = batches(1)
    out = tmp_path / "run"
    eqxtl.fit(model, state, optax.sgd(0.0), spec, data, test_data=data, epochs=3,
              checkpoint=eqxtl.Checkpoint(out),
              runtime=eqxtl.Runtime(eval_every=1, progress=False))  # fmt: skip
    meta = json.loads((out / "best" / "meta.json").read_text())
    values = [r["test_accuracy"] for r in meta["history"]]
    assert values == [values[0]] * 3  # nothing trains: every evaluation ties
    assert meta["step"] == 3 and (out / "best").resolve() == (out / "last").resolve()


# ---------------------------------------------------------------- 9. options


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: eqxtl.EarlyStopping(patience=0), r"EarlyStopping\(patience=\.\.\.\)"),
        (lambda: eqxtl.EarlyStopping(patience=1.5), r"EarlyStopping\(patience=\.\.\.\)"),
        (lambda: eqxtl.EarlyStopping(min_delta=math.nan), r"EarlyStopping\(min_delta=\.\.\.\)"),
        (lambda: eqxtl.EarlyStopping(mode="lower"), r"mode must be"),
        (lambda: eqxtl.ReduceLROnPlateau(factor=1.0), r"ReduceLROnPlateau\(factor=\.\.\.\)"),
        (lambda: eqxtl.ReduceLROnPlateau(factor=0.0), r"ReduceLROnPlateau\(factor=\.\.\.\)"),
        (lambda: eqxtl.ReduceLROnPlateau(factor=2), r"ReduceLROnPlateau\(factor=\.\.\.\)"),
        (lambda: eqxtl.ReduceLROnPlateau(patience=0), r"ReduceLROnPlateau\(patience=\.\.\.\)"),
        (lambda: eqxtl.ReduceLROnPlateau(min_scale=0), r"ReduceLROnPlateau\(min_scale=\.\.\.\)"),
        (lambda: eqxtl.LRSchedule(0.5), r"LRSchedule\(schedule=\.\.\.\)"),
        (lambda: eqxtl.Checkpoint("runs/a", every=0), r"Checkpoint\(every=\.\.\.\)"),
        (lambda: eqxtl.Checkpoint("runs/a", every=math.nan), r"Checkpoint\(every=\.\.\.\)"),
        (lambda: eqxtl.Checkpoint("runs/a", resume="no"), r"Checkpoint\(resume=\.\.\.\)"),
        (lambda: eqxtl.Checkpoint(None), r"Checkpoint\(out_dir=\.\.\.\)"),
        (lambda: eqxtl.Runtime(seed=-1), r"Runtime\(seed=\.\.\.\)"),
        (lambda: eqxtl.Runtime(eval_every=2.5), r"Runtime\(eval_every=\.\.\.\)"),
        (lambda: eqxtl.Runtime(max_nonfinite=-1), r"Runtime\(max_nonfinite=\.\.\.\)"),
        (lambda: eqxtl.Runtime(compute_dtype="int8"), r"Runtime\(compute_dtype=\.\.\.\)"),
        (lambda: eqxtl.Runtime(mesh="all"), r"Runtime\(mesh=\.\.\.\)"),
        (lambda: eqxtl.Runtime(cache_features=1), r"Runtime\(cache_features=\.\.\.\)"),
    ],
)
def test_options_are_checked_where_they_are_given(make, match):
    with pytest.raises(eqxtl.TrainingError, match=match):
        make()


def test_a_schedule_returning_nan_is_named(parts):
    model, state, spec = head(parts)
    with pytest.raises(eqxtl.TrainingError, match=r"LRSchedule: schedule\(0\) returned nan"):
        eqxtl.fit(model, state, optax.sgd(1e-3), spec, batches(1),
                  callbacks=[eqxtl.LRSchedule(lambda step: math.nan)],
                  runtime=eqxtl.Runtime(progress=False))  # fmt: skip


def test_augment_ratio_must_be_finite():
    with pytest.raises(eqxtl.DataError, match=r"Augment.ratio"):
        eqxtl.Augment(ratio=(0.5, math.inf))


# ---------------------------------------------------------------- 5. image formats


def test_image_folder_reads_tiff_and_other_formats_pil_reads(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (12, 10, 3)).astype(np.uint8)
    for c, ext in enumerate([".tif", ".tiff", ".TIF", ".webp", ".bmp", ".ppm"]):
        folder = tmp_path / f"class{c % 2}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(image).save(
            folder / f"{c}{ext}", **({"lossless": True} if ext == ".webp" else {})
        )
    gray16 = (np.arange(120, dtype=np.uint16).reshape(12, 10) * 500).astype(np.uint16)
    Image.fromarray(gray16).save(tmp_path / "class0" / "deep.tiff")
    floats = np.linspace(0, 1, 120, dtype=np.float32).reshape(12, 10)
    Image.fromarray(floats, mode="F").save(tmp_path / "class1" / "float.tif")
    source = eqxtl.ImageFolder(tmp_path)
    assert len(source) == 8 and not source.ignored and not source.skipped
    for i, path in enumerate(source.paths):
        decoded, _ = source[i]
        if path.name == "deep.tiff":
            np.testing.assert_array_equal(decoded[..., 1], np.round(gray16 * (255 / 65535)))
        elif path.name == "float.tif":  # not clipped to 0/1 by convert("RGB")
            np.testing.assert_array_equal(decoded[..., 0], np.round(floats * 255))
        else:
            np.testing.assert_array_equal(decoded, image)


def test_a_float_image_outside_0_1_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    Image.fromarray(np.full((4, 4), 7.5, np.float32), mode="F").save(tmp_path / "a" / "x.tif")
    with pytest.raises(eqxtl.DataError, match=r"float image with values in \[7.5, 7.5\]"):
        eqxtl.ImageFolder(tmp_path)[0]


# ---------------------------------------------------------------- 10. examples


def test_finetune_rps_offline_says_why_it_reads_a_pr_branch(tmp_path, monkeypatch):
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("rps", ROOT / "examples/finetune_rps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.chdir(tmp_path)  # no weights/ folder here
    args = argparse.Namespace(model="clip-vit-base-patch32", weights=None)
    with pytest.raises(SystemExit) as exit_:
        module.load_backbone(args)
    message = str(exit_.value)
    assert "refs/pr/32" in message and "pull-request branch" in message
    assert "model.safetensors" in message and "eqxtl fetch clip-vit-base-patch32" in message


def test_install_hints_name_the_clone_not_the_package_index():
    for path in [
        *(ROOT / "eqxtl").rglob("*.py"),
        *(ROOT / "examples").rglob("*.py"),
        ROOT / "README.md",
    ]:
        if path.parts[-2] in ("models", "io", "tuning"):
            continue  # those packages are checked with their own issue items
        text = path.read_text()
        assert 'install "eqxtl[' not in text and "install eqxtl[" not in text, path


# ---------------------------------------------------------------- 7. Ctrl-C


def test_sigint_is_held_back_until_a_save_is_complete():
    from eqxtl.training.runs import sigint_deferred

    done = []
    with pytest.raises(KeyboardInterrupt):
        with sigint_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            done.append(True)  # still running: the interrupt waits for the block's end
    assert done == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


FIT_SCRIPT = """
import sys
import jax, numpy as np, optax
import eqxtl
from tests._tiny import tiny
from tests.test_trust import batches

backbone, state = tiny("resnet")
model = eqxtl.Classifier(backbone, 2, key=jax.random.key(0))
try:
    eqxtl.fit(model, state, optax.adam(1e-3), eqxtl.trainable(model, "head"), batches(2),
              epochs=100000, callbacks=[eqxtl.Lambda(on_step=lambda run, m: print(
                  f"step {run.step}", flush=True))],
              checkpoint=eqxtl.Checkpoint(sys.argv[1]), runtime=eqxtl.Runtime(progress=False))
except KeyboardInterrupt as e:
    print(f"interrupted: {e}", flush=True)
    sys.exit(7)
"""


def _interrupt_when(proc, ready, timeout=240):
    """Send SIGINT to ``proc`` once ``ready()`` holds; ``(returncode, stdout, stderr)``."""
    start = time.monotonic()
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - start < timeout, "the run did not start in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def test_ctrl_c_in_fit_saves_last_and_reraises_saying_how_to_resume(parts, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", FIT_SCRIPT, str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    lines = []

    def ready():
        lines.append(proc.stdout.readline())
        return lines[-1].startswith("step 5")

    code, rest, err = _interrupt_when(proc, ready)
    assert code == 7, err
    message = rest.strip().splitlines()[-1]
    step = json.loads((out / "last" / "meta.json").read_text())["step"]
    assert step >= 5
    assert message == (
        f"interrupted: Interrupted: the run is saved at step {step} of 200000 in {out / 'last'}. "
        "Run the same call again to resume."
    )
    assert not list((out / "checkpoints").glob(".tmp-*")) and not (out / ".lock").exists()
    model, state, spec = head(parts)
    resumed = eqxtl.fit(model, state, optax.adam(1e-3), spec, batches(2),
                        epochs=step // 2 + 1, checkpoint=eqxtl.Checkpoint(out),
                        runtime=eqxtl.Runtime(progress=False))  # fmt: skip
    assert resumed.resumed_from == step and resumed.step == 2 * (step // 2 + 1)


def test_ctrl_c_without_a_run_folder_says_nothing_was_saved(parts, monkeypatch):
    model, state, spec = head(parts)

    def interrupt(run, metrics):
        if run.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt, match=r"Interrupted at step 2 of 6; nothing was saved"):
        eqxtl.fit(model, state, optax.adam(1e-3), spec, batches(2), epochs=3,
                  callbacks=[eqxtl.Lambda(on_step=interrupt)],
                  runtime=eqxtl.Runtime(progress=False))  # fmt: skip


# ---------------------------------------------------------------- 3, 4, 7, 8. the CLI


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny-clip"
    eqxtl.save_pretrained(*tiny("clip", 0), path)
    return path


def folder(root, classes=("blue", "red"), n=4):
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(n):
            image = rng.integers(0, 100, (40, 40, 3))
            image[..., 2 - 2 * c] += 150
            Image.fromarray(image.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def test_cli_refuses_a_single_class(tmp_path, weights, capsys):
    one = folder(tmp_path / "one", classes=("cat",))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--model", str(weights), "--data", str(one), "--train", "head"])
    assert exit_.value.code == 2
    assert "has one class subfolder (cat)" in capsys.readouterr().err
    (one / "dog").mkdir()  # a second class, but without images
    (one / "dog" / "notes.txt").write_text("no images here")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--model", str(weights), "--data", str(one), "--train", "head",
                  "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "images of 1 class (cat)" in err and "Traceback" not in err


def test_cli_train_says_what_it_found_and_what_it_resumes_in_its_own_words(
    tmp_path, weights, capsys
):
    data = folder(tmp_path / "photos")
    (data / "red" / "readme.md").write_text("not an image")
    (data / "blue" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "run"
    base = ["train", "--model", str(weights), "--data", str(data), "--train", "head",
            "--batch-size", "4", "--quiet", "--out", str(out)]  # fmt: skip
    assert cli.main([*base, "--epochs", "1"]) == 0
    captured = capsys.readouterr()
    found = captured.err.strip().splitlines()[0]
    assert (
        found.startswith("--data: ImageFolder")
        and "8 images in 2 classes (blue: 4, red: 4)" in found
    )
    assert "Skipped 1 unreadable files" in found and "Ignored 1 files" in found
    assert json.loads(captured.out.strip().splitlines()[-1])["resumed_from"] is None

    assert cli.main([*base, "--epochs", "2"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["resumed_from"] == 2
    assert f"Resuming the run in {out} from step 2 of 4." in captured.err.splitlines()

    with pytest.raises(SystemExit) as exit_:
        cli.main([*base, "--epochs", "3", "--lr", "1e-2"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "optimizer hyperparameters" in err
    assert "--restart" in err and "another --out" in err
    assert "resume=False" not in err and "out_dir" not in err and "eqxtl.Checkpoint" not in err


def test_cli_summary_shows_the_classifier_train_builds(weights, capsys):
    assert cli.main(["summary", str(weights), "--train", "head"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Classifier with 2 classes, as `eqxtl train` builds it")
    head_row = next(line for line in out.splitlines() if line.startswith("head "))
    assert head_row.split()[1] == "yes"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["summary", str(weights), "--train", "heads"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "eqxtl.paths" not in err


def test_cli_ctrl_c_saves_and_exits_130_with_one_line(tmp_path, weights):
    data = folder(tmp_path / "photos")
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    argv = [sys.executable, "-m", "eqxtl", "train", "--model", str(weights), "--data", str(data),
            "--train", "head", "--epochs", "100000", "--batch-size", "4", "--eval-every", "1",
            "--quiet", "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip

    def ready():
        history = out / "history.jsonl"
        return history.is_file() and len(history.read_text().splitlines()) >= 3

    code, stdout, stderr = _interrupt_when(proc, ready)
    step = json.loads((out / "last" / "meta.json").read_text())["step"]
    lines = stderr.strip().splitlines()
    assert code == 130 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("--data: ImageFolder") and len(lines) == 2, stderr
    assert lines[1] == (
        f"eqxtl: Interrupted: the run is saved at step {step} of 200000 in {out / 'last'}. "
        "Run the same command again (without --restart) to resume."
    )


# ---------------------------------------------------------------- 10. the quickstart


def _quickstart():
    import importlib.util

    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples/quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_never_writes_into_a_folder_that_is_not_its_own(tmp_path):
    quickstart = _quickstart()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    with pytest.raises(SystemExit, match=r"holds files this script did not write \(notes.txt\)"):
        quickstart.main(["--out", str(tmp_path / "mine")])  # refused before any work
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match=r"is a file"):
        quickstart.check_out(tmp_path / "file")
    earlier = tmp_path / "earlier"  # a previous version's output: its own
    for name in ("frozen", "scratch", "LoRA", "fine-tuned"):
        (earlier / name).mkdir(parents=True)
    (earlier / "summary.json").write_text("{}")
    quickstart.check_out(earlier)
    quickstart.check_out(tmp_path / "new")


def test_quickstart_plot_colours_agree_and_no_legend_hides_a_bar_label():
    quickstart = _quickstart()
    results = {
        name: {"test_accuracy": acc, "losses": [2.0, 1.0, 0.5]}
        for name, acc in zip(quickstart.COLORS, [1.0, 0.99, 0.125, 0.97], strict=True)
    }
    fig = quickstart.figure(results)
    bars, curves = fig.axes
    from matplotlib.colors import to_rgba

    bar_colours = [to_rgba(p.get_facecolor()) for p in bars.patches]
    line_colours = {line.get_label(): to_rgba(line.get_color()) for line in curves.get_lines()}
    assert bar_colours == [line_colours[name] for name in results]
    assert bars.get_legend() is None
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labels = [t for t in bars.texts if t.get_text().endswith("%")]
    chance = [t for t in bars.texts if t.get_text() == "chance"]
    assert len(labels) == 4 and len(chance) == 1
    boxes = [t.get_window_extent(renderer) for t in labels]
    assert not any(b.overlaps(chance[0].get_window_extent(renderer)) for b in boxes)
    assert all(b.y1 <= bars.get_window_extent(renderer).y1 for b in boxes)  # inside the axes


# ---------------------------------------------------------------- 9. more options


def test_split_schedule_and_two_phases_numbers_are_checked(parts):
    source = eqxtl.ArraySource(np.zeros((4, 8, 8, 3), np.uint8), [0, 1, 0, 1])
    for bad in (math.nan, "0.2", 0, 1):
        with pytest.raises(eqxtl.DataError, match=r"split\(fraction=\.\.\.\)"):
            eqxtl.split(source, bad)
    with pytest.raises(eqxtl.DataError, match=r"split\(seed=\.\.\.\)"):
        eqxtl.split(source, 0.5, seed=-1)
    with pytest.raises(eqxtl.TrainingError, match=r"warmup_cosine\(warmup_steps=\.\.\.\)"):
        eqxtl.warmup_cosine(1e-3, 100, warmup_steps=-5)
    with pytest.raises(eqxtl.TrainingError, match=r"warmup_cosine\(peak_lr=\.\.\.\)"):
        eqxtl.warmup_cosine(math.nan, 100)
    model, _, _ = head(parts)
    with pytest.raises(eqxtl.TrainingError, match=r"two_phases\(lr=\.\.\.\)"):
        eqxtl.two_phases(model, lr=-1e-5)


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--lr", "nan"], "--lr nan"),
        (["--lr", "-1"], "--lr -1.0"),
        (["--weight-decay", "inf"], "--weight-decay inf"),
        (["--train", "head=0"], "--train 'head=0'"),
        (["--epochs", "0"], "--epochs must be an integer >= 1"),
        (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
        (["--eval-every", "0"], "--eval-every must be an integer >= 1"),
        (["--seed", "-1"], "--seed must be an integer >= 0"),
    ],
)
def test_cli_numbers_are_refused_in_the_cli_words(tmp_path, weights, capsys, extra, words):
    data = folder(tmp_path / "photos", n=1)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--model", str(weights), "--data", str(data), "--train", "head",
                  "--quiet", "--out", str(tmp_path / "run"), *extra])  # fmt: skip
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and words in err and "Traceback" not in err, err
    assert "(...)" not in err  # no Python call in the message


def test_ctrl_c_stops_at_a_step_end_and_the_resumed_run_is_the_uninterrupted_one(parts, tmp_path):
    model, state, spec = head(parts)
    data = batches(2)

    def interrupt(run, metrics):
        if run.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: handled between bytecodes

    def run(out, callbacks=()):
        return eqxtl.fit(model, state, optax.adam(1e-2), spec, data, epochs=3,
                         callbacks=list(callbacks), checkpoint=eqxtl.Checkpoint(out),
                         runtime=eqxtl.Runtime(progress=False))  # fmt: skip

    with pytest.raises(KeyboardInterrupt, match=r"saved at step 3 of 6"):
        run(tmp_path / "a", [eqxtl.Lambda(on_step=interrupt)])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    resumed = run(tmp_path / "a")
    straight = run(tmp_path / "b")
    assert resumed.resumed_from == 3
    np.testing.assert_array_equal(resumed.model.head.weight, straight.model.head.weight)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scale": (0.5,)}, r"Augment\(scale=\.\.\.\) must be a pair"),
        ({"scale": (0.2, math.nan)}, r"Augment\(scale=\.\.\.\) must be a finite number"),
        ({"ratio": ("a", 1.0)}, r"Augment\(ratio=\.\.\.\) must be a real number"),
        ({"flip": math.nan}, r"Augment\(flip=\.\.\.\)"),
        ({"flip": 1.5}, r"Augment\(flip=\.\.\.\)"),
    ],
)
def test_augment_options_are_checked(kwargs, match):
    with pytest.raises(eqxtl.DataError, match=match):
        eqxtl.Augment(**kwargs)


def test_a_run_folder_from_before_hyperparameters_were_recorded_still_resumes(parts, tmp_path):
    model, state, spec = head(parts)
    out = tmp_path / "run"

    def run(epochs):
        return eqxtl.fit(model, state, optax.adam(1e-3), spec, batches(2), epochs=epochs,
                         checkpoint=eqxtl.Checkpoint(out),
                         runtime=eqxtl.Runtime(progress=False))  # fmt: skip

    run(1)
    stored = json.loads((out / "run.json").read_text())
    assert any("optimizer hyperparameters" in k for k in stored)
    old = {k: v for k, v in stored.items() if "optimizer hyperparameters" not in k}
    (out / "run.json").write_text(json.dumps(old))
    assert run(2).resumed_from == 2
