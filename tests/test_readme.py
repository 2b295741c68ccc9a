"""Every Python snippet in README.md runs, in order, in one namespace (so the README cannot
drift from the API). Hub checkpoints and TFDS datasets are replaced by offline stand-ins of
the same architecture: the golden fixtures in tests/fixtures (real timm / open_clip /
big_vision files at tiny sizes) and random images. Bash blocks are not run here (the command
line has its own tests)."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

import eqxtl

README = Path(__file__).parent.parent / "README.md"
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
    monkeypatch.setattr(eqxtl, "TFDSSource", tfds_source)
    monkeypatch.chdir(tmp_path)
    images = rng.integers(0, 256, size=(4, 40, 40, 3), dtype=np.uint8)
    return {"images": images}


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


def test_every_python_snippet_runs(offline_world):
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 6
    namespace = dict(offline_world)
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as e:  # say which snippet broke
            raise AssertionError(f"README python block {i + 1} fails:\n{block}\n{e!r}") from e
