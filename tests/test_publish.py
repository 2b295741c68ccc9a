"""eqxtl.push_to_hub: the folder it uploads (what save_pretrained writes, read back by
from_pretrained) and its model card (parsed by huggingface_hub.ModelCard), with only the two
Hub calls replaced; offline and a failed upload leave nothing behind."""

import shutil
import tempfile

import huggingface_hub
import jax
import numpy as np
import pytest
import requests
from huggingface_hub import HfApi, ModelCard

import eqxtl
from tests._tiny import tiny_architecture


@pytest.fixture
def model():
    backbone, state = tiny_architecture("resnet")
    model = eqxtl.Classifier(backbone, num_classes=3, key=jax.random.key(1))
    return model.with_training_info(["cat", "dog", "owl"]), state


@pytest.fixture
def staging(tmp_path, monkeypatch):
    """Where push_to_hub stages its folder (a temporary folder that must be gone after)."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def _hub(monkeypatch, tmp_path, fail: Exception | None = None) -> list:
    """``HfApi.create_repo`` / ``upload_folder`` replaced: calls recorded, the uploaded
    folder copied to ``tmp_path/"uploaded"`` (the staging folder is deleted afterwards)."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        if fail is not None:
            raise fail
        shutil.copytree(kwargs["folder_path"], tmp_path / "uploaded")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_the_uploaded_folder_loads_and_its_card_parses(
    model, staging, online, tmp_path, monkeypatch
):
    model, state = model
    calls = _hub(monkeypatch, tmp_path)
    url = eqxtl.push_to_hub(
        model,
        state,
        "someone/pets-resnet",
        base_model="timm/resnet50.a1_in1k",
        datasets=["someone/pets"],
        metrics={"step": 40, "test_accuracy": 0.875, "test_loss": 0.31, "note": "x"},
        private=True,
        local_dir=tmp_path / "kept",
    )
    assert url == "https://huggingface.co/someone/pets-resnet"
    assert [c[:2] for c in calls] == [
        ("create_repo", "someone/pets-resnet"),
        ("upload_folder", "someone/pets-resnet"),
    ]
    assert calls[0][2]["private"] is True and calls[0][2]["exist_ok"] is True
    assert list(staging.iterdir()) == []  # the staging folder is gone

    uploaded = tmp_path / "uploaded"
    kept = sorted(p.name for p in (tmp_path / "kept").iterdir())
    assert sorted(p.name for p in uploaded.iterdir()) == kept
    loaded, loaded_state = eqxtl.from_pretrained(uploaded)
    assert loaded.class_names == ("cat", "dog", "owl")
    want, got = eqxtl.state_dict(model, state), eqxtl.state_dict(loaded, loaded_state)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)

    card = ModelCard.load(uploaded / "README.md")
    assert card.data.library_name == "eqxtl"
    assert card.data.base_model == "timm/resnet50.a1_in1k"
    assert card.data.datasets == ["someone/pets"]
    assert {"eqxtl", "resnet", "image-classification"} <= set(card.data.tags)
    results = {(r.metric_type, r.metric_value, r.dataset_name) for r in card.data.eval_results}
    assert results == {("accuracy", 0.875, "someone/pets"), ("loss", 0.31, "someone/pets")}
    assert 'eqxtl.from_pretrained("someone/pets-resnet")' in card.text
    assert "`owl`" in card.text and "| step | 40 |" in card.text


def test_offline_writes_nothing_anywhere(model, staging, tmp_path, monkeypatch):
    model, state = model
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = _hub(monkeypatch, tmp_path)
    with pytest.raises(eqxtl.SourceError, match="HF_HUB_OFFLINE"):
        eqxtl.push_to_hub(model, state, "someone/pets", local_dir=tmp_path / "kept")
    assert calls == [] and list(staging.iterdir()) == []
    assert not (tmp_path / "kept").exists()


def test_a_failed_upload_is_named_and_leaves_no_staging(
    model, staging, online, tmp_path, monkeypatch
):
    model, state = model
    _hub(monkeypatch, tmp_path, fail=requests.ConnectionError("Name or service not known"))
    with pytest.raises(eqxtl.SourceError, match="uploading to someone/pets failed"):
        eqxtl.push_to_hub(model, state, "someone/pets")
    assert list(staging.iterdir()) == []
    with pytest.raises(ValueError, match="repo_id must be 'user/name'"):
        eqxtl.push_to_hub(model, state, "no slash")
    adapted = eqxtl.lora(model, "head", rank=2, key=jax.random.key(0))
    with pytest.raises(eqxtl.AdapterError, match="merge_lora"):
        eqxtl.push_to_hub(adapted, state, "someone/pets")
    assert list(staging.iterdir()) == []
