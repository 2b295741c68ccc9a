"""The ``eqxtl`` command: train / eval / predict / summary / fetch on image folders."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import numpy as np
import pytest
from PIL import Image

import eqxtl
from eqxtl import cli
from tests._tiny import tiny

ROOT = Path(__file__).resolve().parents[1]


def image_folder(root: Path, n: int = 6, seed: int = 0) -> Path:
    """Two classes, red and blue images with noise."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(["blue", "red"]):
        (root / name).mkdir(parents=True)
        for i in range(n):
            image = rng.integers(0, 100, (40, 40, 3))
            image[..., 2 - 2 * c] += 150
            Image.fromarray(image.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny-clip"
    eqxtl.save_pretrained(*tiny("clip", 0), path)
    return path


def test_help_does_not_import_jax():
    code = (
        "import sys\n"
        "from eqxtl import cli\n"
        "for argv in (['--help'], ['train', '--help']):\n"
        "    try:\n"
        "        cli.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "assert 'jax' not in sys.modules, sorted(m for m in sys.modules if 'jax' in m)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr
    assert "--train RULE[=LR]" in run.stdout and "--batch-size" in run.stdout


def test_train_eval_predict_on_an_image_folder(tmp_path, weights, monkeypatch, capsys):
    data = image_folder(tmp_path / "photos")
    monkeypatch.chdir(tmp_path)  # the run goes under runs/ by default
    argv = ["train", "--model", str(weights), "--data", str(data), "--val", str(data),
            "--train", "head=3e-2", "--epochs", "6", "--batch-size", "4", "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    best = Path(out["best"])
    assert best.resolve().is_relative_to((tmp_path / "runs" / "photos-tiny-clip").resolve())
    assert out["test_accuracy"] == 1.0

    assert cli.main(["eval", "--model", str(best), "--data", str(data)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["count"] == 12 and evaluated["accuracy"] == 1.0
    # some of the model's classes (matched by name), and one it does not know
    shutil.copytree(data / "red", tmp_path / "some" / "red")
    with pytest.warns(UserWarning, match="Empty classes"):
        assert cli.main(["eval", "--model", str(best), "--data", str(tmp_path / "some")]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["count"] == 6 and evaluated["accuracy"] == 1.0
    shutil.copytree(data / "red", tmp_path / "some" / "purple")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["eval", "--model", str(best), "--data", str(tmp_path / "some")])
    assert exit_.value.code == 2
    assert "['purple'] that are not among" in capsys.readouterr().err

    files = [str(data / "red" / "0.png"), str(data / "blue" / "1.png")]
    assert cli.main(["predict", "--model", str(best), *files]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[:2] for line in lines] == [[files[0], "red"], [files[1], "blue"]]


def test_predict_decodes_files_as_the_library_does(tmp_path, weights, capsys):
    """A 16-bit PNG (convert("RGB") would clip it white) and an EXIF-rotated JPEG: the
    command's probabilities are those of eqxtl.predict on the library's decoding."""
    import jax

    from eqxtl.data.images import as_rgb

    backbone, state = eqxtl.from_pretrained(weights)
    model = eqxtl.Classifier(backbone, 3, key=jax.random.key(0))
    eqxtl.save_pretrained(model, state, tmp_path / "clf")
    ramp = np.tile(np.linspace(0, 65535, 40).astype(np.uint16), (40, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    photo = Image.new("RGB", (40, 20))
    photo.paste((255, 255, 255), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: shown 20 wide, 40 high
    photo.save(tmp_path / "rot6.jpg", exif=exif, quality=95)
    files = [str(tmp_path / "ramp16.png"), str(tmp_path / "rot6.jpg")]
    decoded = []
    for f in files:
        with Image.open(f) as im:
            decoded.append(as_rgb(im))
    assert decoded[1].shape == (40, 20, 3)
    want = eqxtl.predict(model, state, decoded)
    assert cli.main(["predict", "--model", str(tmp_path / "clf"), *files]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    for line, p in zip(lines, want, strict=True):
        _, name, prob = line.split("\t")
        assert (int(name), float(prob)) == (int(np.argmax(p)), round(float(np.max(p)), 4))


def test_rules_are_checked_before_any_image_is_read(tmp_path, weights, monkeypatch, capsys):
    data = image_folder(tmp_path / "photos", n=1)

    def no_reading(*args, **kwargs):
        raise AssertionError("images read before the rules were checked")

    monkeypatch.setattr(eqxtl, "ImageFolder", no_reading)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--model", str(weights), "--data", str(data), "--train", "heads"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "heads" in err and "Traceback" not in err


def test_a_data_folder_without_class_subfolders_is_refused(tmp_path, weights, capsys):
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--model", str(weights), "--data", str(tmp_path / "flat"),
                  "--train", "head"])  # fmt: skip
    assert exit_.value.code == 2
    assert "has no class subfolders" in capsys.readouterr().err


def test_fetch_refuses_two_names_for_one_folder(tmp_path, weights):
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        os.symlink(weights, tmp_path / run / "best")
    names = [str(tmp_path / "a" / "best"), str(tmp_path / "b" / "best")]
    with pytest.raises(SystemExit, match="would both be written to"):
        cli.main(["fetch", *names, "--out", str(tmp_path / "w")])
    assert not (tmp_path / "w").exists()


def test_fetch_goes_on_past_a_failure_and_reports_each_name(tmp_path, weights, capsys):
    code = cli.main(["fetch", "no-such-org/no-such-model", str(weights), "--out",
                     str(tmp_path / "w")])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1
    assert "no-such-org/no-such-model: failed" in captured.err
    assert "1 of 2 failed" in captured.err
    assert f"{weights} :" not in captured.out and "tiny-clip" in captured.out
    loaded, _ = eqxtl.from_pretrained(tmp_path / "w" / "tiny-clip")
    assert eqxtl.count(loaded) > 0


def test_summary_prints_what_trains(weights, capsys):
    # the model `train` builds: the backbone under a head
    assert cli.main(["summary", str(weights), "--train", "backbone.encoder.layers.3"]) == 0
    assert "backbone.encoder.layers.3" in capsys.readouterr().out


def test_a_checkpoint_stored_in_bfloat16_trains_in_float32(tmp_path, weights, capsys):
    """`train` and `summary` load the model in float32: a bfloat16 checkpoint would train in
    bfloat16 (most updates rounding away), which the spec builders refuse."""
    import jax
    import jax.numpy as jnp

    model, state = eqxtl.from_pretrained(weights)
    small = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if eqx.is_inexact_array(x) else x, model)
    eqxtl.save_pretrained(small, state, tmp_path / "bf16")
    assert eqxtl.from_pretrained(tmp_path / "bf16")[0].embeddings.patch_embedding.weight.dtype == (
        jnp.bfloat16
    )
    with pytest.raises(eqxtl.RuleError, match="bfloat16"):
        eqxtl.everything(eqxtl.from_pretrained(tmp_path / "bf16")[0])
    assert cli.main(["summary", str(tmp_path / "bf16"), "--train", "backbone"]) == 0
    assert "backbone" in capsys.readouterr().out
