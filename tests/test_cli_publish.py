"""``eqxtl train --push-to-hub REPO``: the run's best checkpoint and its evaluation reach the
Hub (only the two Hub calls replaced); offline it stops before training."""

import json
import shutil

import huggingface_hub
import pytest
from huggingface_hub import HfApi, ModelCard

import eqxtl
from eqxtl import cli
from tests.test_cli import image_folder, weights  # noqa: F401  (a fixture)


def test_train_then_push(tmp_path, weights, monkeypatch, capsys):  # noqa: F811
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(repo_id))

    def upload_folder(self, **kwargs):
        calls.append(kwargs["repo_id"])
        shutil.copytree(kwargs["folder_path"], tmp_path / "uploaded")

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    data = image_folder(tmp_path / "photos", n=2)
    argv = ["train", "--model", str(weights), "--data", str(data), "--val", str(data),
            "--train", "head=3e-2", "--batch-size", "4", "--quiet",
            "--out", str(tmp_path / "run"), "--push-to-hub", "someone/colours"]  # fmt: skip
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert calls == ["someone/colours", "someone/colours"]
    model, _ = eqxtl.from_pretrained(tmp_path / "uploaded")
    assert model.class_names == ("blue", "red")
    card = ModelCard.load(tmp_path / "uploaded" / "README.md")
    assert card.data.library_name == "eqxtl" and card.data.base_model is None  # a local folder
    (accuracy,) = [r.metric_value for r in card.data.eval_results if r.metric_type == "accuracy"]
    assert accuracy == out["test_accuracy"]


def test_offline_stops_before_training(tmp_path, weights, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = image_folder(tmp_path / "photos", n=1)
    argv = ["train", "--model", str(weights), "--data", str(data), "--train", "head",
            "--out", str(tmp_path / "run"), "--push-to-hub", "someone/colours"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit):
        cli.main([*argv[:-1], "not-a-repo"])
    assert "a Hub repo is 'user/name'" in capsys.readouterr().err
