"""CLIP's tokenizer: byte-level BPE read from a checkpoint's own files.

The BPE itself is Hugging Face ``tokenizers``'; this module only reads the files and sets
the pipeline transformers' ``CLIPTokenizer`` uses: NFC, whitespace runs to one space,
lower case, CLIP's pre-tokenising regex, ``<|startoftext|> ... <|endoftext|>``, truncation
to the context length (the end token is kept) and padding with the checkpoint's pad token.

    tokenizer = eqxtl.Tokenizer.from_pretrained("path/to/openai-clip-vit-base-patch32")
    ids = tokenizer(["a photo of a cat", "a photo of a dog"])   # (2, 77) int32
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, DataError, SourceError
from .json_files import read_object

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
CONTEXT_LENGTH = 77
# CLIP's pre-tokenising regex (openai/CLIP simple_tokenizer.py), as transformers' CLIPTokenizer
# passes it to `tokenizers`.
_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
    r"""[^\s\p{L}\p{N}]+"""
)
_CONFIGS = ("tokenizer_config.json", "special_tokens_map.json")


def _pipeline(vocab: dict[str, int], merges: list[tuple[str, str]]):
    """A ``tokenizers.Tokenizer`` with CLIP's pipeline around a BPE model (what transformers'
    ``CLIPTokenizer`` builds from vocab.json + merges.txt)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    backend = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=EOS,
        )
    )
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


class Tokenizer:
    """Texts -> token ids ``(N, context_length)`` int32 for CLIP's text tower.

    Every row is ``<|startoftext|>``, the text's tokens (truncated so that the row fits),
    ``<|endoftext|>``, then the pad id (the checkpoint's ``pad_token``; transformers'
    default ``<|endoftext|>``). Build it with ``from_pretrained`` (a checkpoint folder or
    hub repo), ``from_file`` (a ``tokenizer.json``) or ``from_vocab`` (vocab.json +
    merges.txt).
    """

    def __init__(
        self,
        backend,
        *,
        context_length: int = CONTEXT_LENGTH,
        pad_token: str = EOS,
    ):
        """``backend``: a ``tokenizers.Tokenizer`` holding CLIP's vocabulary."""
        from tokenizers import AddedToken, processors

        if context_length < 2:
            raise ValueError(f"context_length must be >= 2, got {context_length}.")
        ids = {}
        for token in (BOS, EOS, pad_token):
            ids[token] = backend.token_to_id(token)
            if ids[token] is None:
                raise CheckpointError(
                    f"The tokenizer's vocabulary has no {token!r}: it is not the byte-level "
                    "BPE vocabulary of an image-text model's text tower."
                )
        backend = backend.__class__.from_str(backend.to_str())  # a private copy
        # As transformers registers them: matched in the raw text, before lower-casing.
        backend.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(ids)]
        )
        backend.post_processor = processors.RobertaProcessing(
            (EOS, ids[EOS]), (BOS, ids[BOS]), trim_offsets=False, add_prefix_space=False
        )
        backend.enable_truncation(max_length=context_length)
        backend.enable_padding(pad_id=ids[pad_token], pad_token=pad_token, length=context_length)
        self.backend = backend
        self.context_length = context_length
        self.pad_token = pad_token
        self.bos_token_id, self.eos_token_id = ids[BOS], ids[EOS]
        self.pad_token_id = ids[pad_token]

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """Ids ``(N, context_length)`` int32 (``(context_length,)`` for one string)."""
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        bad = [t for t in batch if not isinstance(t, str)]
        if bad:
            raise DataError(f"Tokenizer takes strings, got {type(bad[0]).__name__}: {bad[0]!r}.")
        encodings = self.backend.encode_batch(batch) if batch else []
        ids = np.array([e.ids for e in encodings], np.int32).reshape(-1, self.context_length)
        return ids[0] if single else ids

    def decode(self, ids: Sequence[int]) -> str:
        """The lower-cased text of ``ids`` (special tokens and padding left out)."""
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=True)
        return text.replace("</w>", " ").strip()

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs) -> Tokenizer:
        """From a ``tokenizer.json`` (as transformers saves CLIP's)."""
        from tokenizers import Tokenizer as Backend

        try:
            backend = Backend.from_file(str(path))
        except Exception as e:  # tokenizers raises its own exception type
            raise CheckpointError(f"{path} is not a valid tokenizer.json: {e}") from None
        return cls(backend, **kwargs)

    @classmethod
    def from_vocab(cls, vocab: str | os.PathLike, merges: str | os.PathLike, **kwargs) -> Tokenizer:
        """From ``vocab.json`` + ``merges.txt`` (the files of transformers' slow format)."""
        from tokenizers.models import BPE

        try:
            vocab_map, merge_list = BPE.read_file(str(vocab), str(merges))
        except Exception as e:
            raise CheckpointError(
                f"Cannot read {vocab} + {merges} as a BPE vocabulary: {e}"
            ) from None
        return cls(_pipeline(vocab_map, merge_list), **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        context_length: int = CONTEXT_LENGTH,
    ) -> Tokenizer:
        """From a checkpoint: a local folder (or a weights file inside one), a Hugging Face
        repo id, or a registry alias. Reads ``tokenizer.json``, else ``vocab.json`` +
        ``merges.txt``; the pad token from ``tokenizer_config.json`` /
        ``special_tokens_map.json`` when present."""
        files = _tokenizer_files(source, revision, cache_dir)
        kwargs = {"context_length": context_length, "pad_token": _pad_token(files)}
        if "tokenizer.json" in files:
            return cls.from_file(files["tokenizer.json"], **kwargs)
        return cls.from_vocab(files["vocab.json"], files["merges.txt"], **kwargs)


def _pad_token(files: dict[str, Path]) -> str:
    for name in _CONFIGS:
        if name in files:
            fix = "Fix or remove it, or copy the checkpoint's tokenizer files again."
            pad = read_object(files[name], "a tokenizer config", fix).get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
            if isinstance(pad, str):
                return pad
    return EOS


def _tokenizer_files(source, revision, cache_dir) -> dict[str, Path]:
    from ..models.registry import REGISTRY
    from . import hub

    key = str(source)
    if key in REGISTRY:
        _, alias = REGISTRY[key]
        if alias.repo is None:
            raise SourceError(f"Alias {key!r} has no hub repo to read a tokenizer from.")
        return _hub_files(alias.repo, revision or alias.revision, cache_dir)
    if hub.looks_local(source):
        folder = Path(source).expanduser()
        if folder.is_file():
            folder = folder.parent
        if not folder.is_dir():
            raise SourceError(f"{folder} does not exist.")
        return _local_files(folder)
    return _hub_files(key, revision, cache_dir)


def _local_files(folder: Path) -> dict[str, Path]:
    names = ("tokenizer.json", "vocab.json", "merges.txt", *_CONFIGS)
    files = {n: folder / n for n in names if (folder / n).is_file()}
    _check_complete(files, str(folder))
    return files


def _hub_files(repo: str, revision: str | None, cache_dir) -> dict[str, Path]:
    from . import hub

    files = {}
    for name in ("tokenizer.json", "vocab.json", "merges.txt", *_CONFIGS):
        if name in ("vocab.json", "merges.txt") and "tokenizer.json" in files:
            continue
        path = hub._download(repo, name, revision, cache_dir, optional=True)
        if path is not None:
            files[name] = path
    if not files:  # offline and not cached: say so (SourceError), or the repo has none
        hub._download(repo, "tokenizer.json", revision, cache_dir)
    _check_complete(files, f"{repo}@{revision or 'main'}")
    return files


def _check_complete(files: dict[str, Path], where: str) -> None:
    if "tokenizer.json" in files:
        return
    missing = [n for n in ("vocab.json", "merges.txt") if n not in files]
    if missing:
        raise CheckpointError(
            f"{where} has no tokenizer.json, and {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing for the vocab.json + merges.txt "
            "form: copy the tokenizer files of the checkpoint (e.g. from its hub repo) into it."
        )
