"""examples/quickstart.py end to end on the real packaged EfficientNet-Lite0 weights, at a
reduced size (the README's full run takes about two minutes)."""

import importlib.util
import json
import re
from pathlib import Path

import eqxtl

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def stated_ranges() -> dict[str, tuple[float, float]]:
    """``{run: (low, high)}`` test accuracy of the reduced run, as docs/quickstart.md states
    them (``- `frozen`: 60–100 %``)."""
    text = (ROOT / "docs" / "quickstart.md").read_text()
    found = re.findall(r"^- `([\w-]+)`: (\d+)–(\d+) %$", text, flags=re.M)
    return {run: (int(low) / 100, int(high) / 100) for run, low, high in found}


def _quickstart():
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples/quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_small_run(tmp_path):
    quickstart = _quickstart()
    train, test = quickstart.textures(shots=3, test_per_class=4, seed=0)
    # train and test crops come from disjoint column ranges of each photograph
    assert quickstart.TRAIN_PART[1] < quickstart.TEST_PART[0]
    assert len(train) == 3 * len(quickstart.CLASSES) and len(test) == 4 * len(quickstart.CLASSES)

    summary = quickstart.main(
        [
            *("--shots", "3", "--test-per-class", "4", "--size", "64", "--steps", "2"),
            *("--head-epochs", "40", "--batch-size", "8", "--out", str(tmp_path), "--no-progress"),
        ]
    )
    accuracy = summary["test_accuracy"]
    assert set(accuracy) == {"frozen", "fine-tuned", "scratch", "LoRA"}
    assert 0 < summary["trainable_share"]["LoRA"] < summary["trainable_share"]["fine-tuned"]
    # pretrained ImageNet features separate these textures even from 3 examples each
    ranges = stated_ranges()
    assert set(ranges) == set(accuracy)
    outside = {r: a for r, a in accuracy.items() if not ranges[r][0] <= a <= ranges[r][1]}
    assert outside == {}, (accuracy, ranges)
    assert accuracy["frozen"] > accuracy["scratch"], accuracy
    assert json.loads((tmp_path / "summary.json").read_text())["test_accuracy"] == accuracy
    assert (tmp_path / "comparison.png").read_bytes()[:8] == PNG_SIGNATURE
    # only what the user needs: no run folder per run
    assert {p.name for p in tmp_path.iterdir()} == {"fine-tuned", "summary.json", "comparison.png"}
    assert {p.name for p in (tmp_path / "fine-tuned").iterdir()} == {"best"}
    model, _ = eqxtl.from_pretrained(tmp_path / "fine-tuned" / "best", keep_head=True)
    assert model.num_classes == len(quickstart.CLASSES)
    assert list(model.class_names) == list(quickstart.CLASSES)
