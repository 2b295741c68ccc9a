"""Reading the JSON config files of checkpoints and adapters: a clear error naming the file
and what was expected, never a bare ``JSONDecodeError`` or ``AttributeError``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import CheckpointError


def read_object(path: str | os.PathLike, what: str, fix: str) -> dict[str, Any]:
    """The JSON object in ``path``; ``CheckpointError`` naming the file when it is not valid
    JSON or holds something else (a list, a string).

    **Arguments:**

    - `what`: what the file should be ("a model config", "PEFT's adapter config").
    - `fix`: what the user can do, one sentence.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}), so not {what}. {fix}") from None
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{path} holds a JSON {type(data).__name__}, but {what} is a JSON object "
            f"({{...}}). {fix}"
        )
    return data
