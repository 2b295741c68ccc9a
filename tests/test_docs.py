"""Every Python block of README.md and of every page of the documentation site (docs/) runs,
in order, one namespace per page that starts empty (so no page can drift from the API or lean
on names it never defines). Hub checkpoints and TFDS datasets are replaced by offline
stand-ins of the same architecture: the golden fixtures in tests/fixtures (real timm /
open_clip / big_vision files at tiny sizes) and random images; local files a page names
(``photos/train``) are made in the page's working folder; the two Hub calls that upload
(``HfApi.create_repo`` / ``upload_folder``) copy the folder to ``hub/<repo id>`` there
instead, with the Hub switched on. Real offline weights (the packaged
EfficientNet-Lite0) are used as they are. Bash blocks are not run here (the command line has
its own tests); ``mkdocs build --strict`` runs in ``.ci/run``."""

import importlib
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

import eqxtl

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
FIXTURES = Path(__file__).parent / "fixtures"

# source name in the README -> (stand-in path, keyword arguments forced for the tiny model)
STAND_INS = {
    "clip-vit-base-patch32": ("open_clip_vit", {}),
    "laion/CLIP-ViT-B-32-laion2B-s34B-b79K": ("open_clip_vit", {}),
    "resnet50": ("timm_resnet", {}),
    "microsoft/resnet-18": ("timm_resnet", {}),
    "timm/resnet50.a1_in1k": ("timm_resnet", {}),
    "weights/resnet50": ("timm_resnet", {}),
    "resnet50-0676ba61.pth": ("timm_resnet/state_dict.pth", {}),
    "model.safetensors": ("timm_resnet/model.safetensors", {}),
    "dinov2-small": ("timm_dinov2", {}),
    "siglip-base-patch16-224": ("big_vision_siglip/siglip_tiny.npz", {"num_attention_heads": 4}),
    "webli_en_b16_224.npz": ("big_vision_siglip/siglip_tiny.npz", {"num_attention_heads": 4}),
}


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _tiny_tokenizer_folder(folder: Path) -> Path:
    """A byte-level CLIP vocabulary without merges (514 ids): the tiny text tower of the
    open_clip fixture has 1,000 token embeddings, the end token must be the largest id."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


@pytest.fixture
def offline_world(tmp_path, monkeypatch):
    """The stand-ins, patched into eqxtl, and the names a README reader already has."""
    real_from_pretrained = eqxtl.from_pretrained
    real_tokenizer = eqxtl.Tokenizer.from_pretrained
    tokenizer_dir = _tiny_tokenizer_folder(tmp_path / "tokenizer")

    def from_pretrained(source, **kwargs):
        if str(source) in STAND_INS:
            path, forced = STAND_INS[str(source)]
            kwargs = {**kwargs, **forced}
            source = FIXTURES / path
        return real_from_pretrained(source, **kwargs)

    def tokenizer_from_pretrained(source, **kwargs):
        return real_tokenizer(tokenizer_dir, context_length=16)

    rng = np.random.default_rng(0)

    def tfds_source(name, split, **kwargs):
        n = 24 if split == "train" else 12
        labels = np.arange(n) % 3
        images = rng.integers(0, 256, size=(n, 40, 40, 3), dtype=np.uint8)
        images[..., 0] = (labels * 100)[:, None, None].astype(np.uint8)  # learnable
        return eqxtl.ArraySource(images, labels, class_names=["rock", "paper", "scissors"])

    monkeypatch.setattr(eqxtl, "from_pretrained", from_pretrained)
    monkeypatch.setattr(eqxtl.Tokenizer, "from_pretrained", tokenizer_from_pretrained)
    _hub_uploads_to(tmp_path / "hub", monkeypatch)
    monkeypatch.setattr(eqxtl, "TFDSSource", tfds_source)
    monkeypatch.chdir(tmp_path)
    _photo_folders(tmp_path / "photos", rng)


def _hub_uploads_to(root: Path, monkeypatch) -> None:
    """``push_to_hub`` with only its two Hub calls replaced: the upload lands in ``root``."""
    import shutil

    import huggingface_hub

    def create_repo(self, repo_id, **kwargs):
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        shutil.copytree(folder_path, root / repo_id, dirs_exist_ok=True)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def _photo_folders(root: Path, rng) -> None:
    """``photos/{train,val,test}/<class>/*.jpg``: small JPEGs, two classes."""
    from PIL import Image

    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        for label, name in enumerate(("cat", "dog")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
                pixels[..., label] = 255
                Image.fromarray(pixels).save(root / split / name / f"{i}.jpg")


def run_blocks(path: Path) -> None:
    blocks = python_blocks(path.read_text())
    namespace: dict = {}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{path.name} python block {i + 1}", "exec"), namespace)
        except Exception as e:  # say which snippet broke
            raise AssertionError(f"{path} python block {i + 1} fails:\n{block}\n{e!r}") from e


def test_readme_has_the_two_setup_commands():
    text = README.read_text()
    setup = re.search(r"## Set up and run\n\n```bash\n(.*?)```", text, flags=re.S).group(1)
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    ci_test_command = ci[ci.index("# The README's test command:") + 1]
    assert setup.strip().splitlines() == [
        'pip install -e ".[quickstart]" && python examples/quickstart.py',
        ci_test_command,  # CI runs exactly what the README tells users to run
    ]
    assert "constraints.txt" in ci_test_command


def test_every_readme_snippet_runs(offline_world):
    assert len(python_blocks(README.read_text())) >= 1
    run_blocks(README)


@pytest.mark.parametrize("page", PAGES)
def test_every_docs_snippet_runs(page, offline_world):
    run_blocks(DOCS / page)


def test_readme_stays_short_and_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    for target in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / target).is_file(), target


def test_every_page_is_in_the_site_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    assert [p for p in PAGES if f": {p}" not in nav] == []


def test_the_api_reference_has_every_public_name_and_only_those():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    names = hooks.public_names()
    assert sorted(names) == sorted(eqxtl.__all__)
    for name, target in names.items():  # each points at the object eqxtl exports
        module, attr = target.rsplit(".", 1)
        assert getattr(importlib.import_module(module), attr) is getattr(eqxtl, name), name
    page = hooks.on_page_markdown((DOCS / "api.md").read_text(), None, None, None)
    assert page.count("\n::: ") == len(names)


def test_the_readme_table_names_every_public_name():
    table = README.read_text().split("## What is in it", 1)[1].split("\n## ", 1)[0]
    assert [name for name in eqxtl.__all__ if f"`{name}`" not in table] == []
