"""A run folder: the lock, the stored run configuration, checkpoints and the history.

```
out_dir/
  .lock                    {"pid", "host"} while a run uses the folder
  run.json                 what the run is (model shapes, spec, optimizer state, seed, ...)
  checkpoints/step-N-*/    model.safetensors + config.json (save_pretrained layout: gathered),
                           train_state/ (model, BatchNorm state, optimizer state: orbax, each
                           process its own shards; ``train_state``), meta.json
  last -> checkpoints/...  symbolic links, each replaced in one atomic rename: a kill at any
  best -> checkpoints/...  moment leaves both pointing at complete checkpoints
  history.json             every record so far (strict JSON: a non-finite number is null)
  history.jsonl            one JSON line per record, appended as the run goes
```

A checkpoint directory is written whole under a temporary name (``stage``: every process
writes its shards of the training state there, then process 0 the rest), synced, renamed into
``checkpoints/`` and only then linked; directories no link points to are deleted. ``last``
and ``best`` share one directory when they are the same step (one copy, not two).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import numbers
import os
import shutil
import signal
import socket
import threading
import time
import types
import warnings
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np

from .._util import finite
from .._util.pytree_paths import keypath_to_str, leaves_with_paths
from ..errors import TrainingError
from . import train_state

TRAIN_STATE = "train_state"
OLD_TRAIN_STATE = "train_state.eqx"  # one file by process 0: run folders of the old layout
META = "meta.json"
LINKS = ("last", "best")
HYPER = "optimizer hyperparameters"


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    if isinstance(value, float | np.floating) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def dumps(value: Any, **kwargs) -> str:
    return json.dumps(strict_json(value), allow_nan=False, **kwargs)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in path.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        elif p.is_dir() and not p.is_symlink():
            _fsync_tree(p)
    _fsync_dir(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signature(model, phases: list[tuple[Any, Any]], **scalars) -> dict[str, Any]:
    """What identifies a run, flat ``{"what: path": value}``: the model's leaf shapes and
    dtypes; per phase ``(spec, opt_state)`` the trainable leaves and the optimizer state's
    leaf shapes (``opt_state`` may be ``jax.eval_shape``'s); plus ``scalars`` (seed, batch
    size, data length...)."""
    out: dict[str, Any] = {}
    for p, x in leaves_with_paths(model):
        out[f"model: {p}"] = f"{tuple(x.shape)} {x.dtype}"
    for i, (spec, opt_state) in enumerate(phases):
        flat, treedef = jtu.tree_flatten_with_path(model)
        for (kp, x), on in zip(flat, treedef.flatten_up_to(spec), strict=True):
            if on and eqx.is_array(x):
                out[f"phase {i} trains: {keypath_to_str(kp)}"] = True
        for p, x in leaves_with_paths(opt_state):
            out[f"phase {i} optimizer state: {p}"] = f"{tuple(x.shape)} {x.dtype}"
    for k, v in scalars.items():
        out[k] = v
    return out


def optimizer_hyperparameters(optimizer, _depth: int = 0, _seen=None) -> list[float]:
    """The numbers an optax transformation was built with (learning rates, schedule
    boundaries, betas, weight decay...), read from its functions' closures: optax keeps no
    other record of them, and the optimizer state's shapes do not change with them. Two
    optimizers built by the same code with the same numbers give the same list."""
    seen = set() if _seen is None else _seen
    x = optimizer
    if _depth > 40 or x is None or isinstance(x, bool | str) or id(x) in seen:
        return []
    if isinstance(x, numbers.Number):
        return [float(f"{float(x):.10g}")]
    if isinstance(x, np.ndarray | jax.Array):
        a = np.asarray(x)
        small = a.size <= 16 and a.dtype.kind in "fiu"
        return [float(f"{v:.10g}") for v in a.ravel().tolist()] if small else []
    seen.add(id(x))
    if isinstance(x, types.FunctionType):
        cells = []
        for cell in x.__closure__ or ():
            try:
                cells.append(cell.cell_contents)
            except ValueError:  # an empty cell
                continue
        parts = [*cells, *(x.__defaults__ or ())]
    elif isinstance(x, functools.partial):
        parts = [x.func, *x.args, *(x.keywords[k] for k in sorted(x.keywords))]
    elif isinstance(x, tuple | list):  # chains, NamedTuple transformations
        parts = list(x)
    elif isinstance(x, dict):  # multi_transform's {label: transformation}
        parts = [x[k] for k in sorted(x, key=str)]
    else:
        return []
    return [v for part in parts for v in optimizer_hyperparameters(part, _depth + 1, seen)]


def differences(stored: dict, current: dict, per_kind: int = 3) -> list[str]:
    """Readable differences between two run signatures, a few per kind of entry."""
    kinds: dict[str, list[str]] = {}
    for key in list(stored) + [k for k in current if k not in stored]:
        a, b = stored.get(key, "(absent)"), current.get(key, "(absent)")
        if a != b:
            kind, _, what = key.partition(": ")
            kinds.setdefault(kind, []).append(f"{what}: {a} -> {b}" if what else f"{a} -> {b}")
    out = []
    for kind, items in kinds.items():
        more = f" (+{len(items) - per_kind} more)" if len(items) > per_kind else ""
        out.append(f"{kind}: {', '.join(items[:per_kind])}{more}")
    return out


@contextlib.contextmanager
def sigint_deferred():
    """Hold Ctrl-C (SIGINT) back while the block runs, then hand it to the handler that was
    in place (by default: raise ``KeyboardInterrupt``): a checkpoint is written whole, never
    cut by an interrupt in the middle of a file or of a library call. Main thread only
    (where Python runs signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda *_: received.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        if previous is signal.default_int_handler or previous is None:
            raise KeyboardInterrupt
        if callable(previous):
            previous(signal.SIGINT, None)


@contextlib.contextmanager
def sigint_at_step_end(flag):
    """While the block runs, a first Ctrl-C sets ``flag.interrupt_requested`` (the loop
    stops at the end of the step, where model, state, optimizer state and step agree); a
    second one raises ``KeyboardInterrupt`` at once. Main thread, default handler only."""
    default = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if not default or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if flag.interrupt_requested:
            raise KeyboardInterrupt
        flag.interrupt_requested = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def stage(out_dir: str | os.PathLike, step: int) -> Path:
    """The empty folder ``checkpoints/.tmp-step-N`` in ``out_dir`` that the checkpoint of
    step ``step`` is written into (process 0 makes it; every process returns once it
    exists). ``RunDir.recover`` deletes what a kill leaves of it."""
    staged = Path(out_dir) / "checkpoints" / f".tmp-step-{step}"
    if jax.process_index() == 0:
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
    barrier("eqxtl-checkpoint-staged")
    return staged


def barrier(name: str) -> None:
    """Wait for every process (nothing with one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class RunDir:
    """One run's folder (see the module docstring); ``with RunDir(...)`` holds its lock."""

    def __init__(self, path: str | os.PathLike, *, is_writer: bool = True):
        self.path = Path(path)
        self.is_writer = is_writer
        self._locked = False

    # ------------------------------------------------------------------ lock

    def __enter__(self) -> RunDir:
        if self.is_writer:
            self._lock()
        return self

    def __exit__(self, *exc) -> None:
        if self._locked:
            (self.path / ".lock").unlink(missing_ok=True)
            self._locked = False

    def _lock(self) -> None:
        lock = self.path / ".lock"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            for _ in range(2):
                try:
                    fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    self._check_stale(lock)
                    continue
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
                self._locked = True
                return
        except OSError as e:
            raise TrainingError(
                f"Cannot write to the run folder {self.path} ({e.strerror or e}): choose a "
                "writable out_dir (checked before training, so nothing was lost)."
            ) from None
        raise TrainingError(f"Could not take the lock {lock}; remove it if no run is using it.")

    def _check_stale(self, lock: Path) -> None:
        try:
            owner = json.loads(lock.read_text())
            pid, host = int(owner["pid"]), str(owner["host"])
        except (OSError, ValueError, KeyError, TypeError):
            owner, pid, host = None, None, None
        if owner is not None and host == socket.gethostname() and not _pid_alive(pid):
            warnings.warn(
                f"Removing the stale lock of process {pid}, which has ended: {lock}.", stacklevel=2
            )
            lock.unlink(missing_ok=True)
            return
        who = f"process {pid} on {host}" if owner else "another run"
        raise TrainingError(
            f"The run folder {self.path} is in use by {who} (lock file {lock}). Wait for it "
            "to finish or use another out_dir; if that run is gone, delete the lock file."
        )

    # ------------------------------------------------------------------ start

    def recover(self) -> None:
        """Clean what a killed run left: temporary directories and links, checkpoint
        directories no link points to; migrate ``last``/``best`` directories of the old
        layout (plain directories, not links) into ``checkpoints/``."""
        ckpts = self.path / "checkpoints"
        for link in LINKS:
            tmp = self.path / f".{link}.link"
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
            plain = self.path / link
            if plain.is_dir() and not plain.is_symlink():
                ckpts.mkdir(exist_ok=True)
                target = ckpts / f"{link}-legacy-{time.time_ns():x}"
                os.rename(plain, target)
                self._link(link, target)
        # the old layout's interrupted swaps (".last-new-*", ".best-old-*")
        for name in LINKS:
            for stale in self.path.glob(f".{name}-new-*"):
                shutil.rmtree(stale, ignore_errors=True)
            for old in sorted(self.path.glob(f".{name}-old-*")):
                if not (self.path / name).exists() and (old / META).is_file():
                    ckpts.mkdir(exist_ok=True)
                    target = ckpts / f"{name}-legacy-{time.time_ns():x}"
                    os.rename(old, target)
                    self._link(name, target)
                else:
                    shutil.rmtree(old, ignore_errors=True)
        if ckpts.is_dir():
            for p in ckpts.iterdir():
                if p.name.startswith(".tmp-"):
                    shutil.rmtree(p, ignore_errors=True)
            self._collect()

    def reset(self) -> None:
        """Forget a previous run in this folder (``resume=False``)."""
        for link in LINKS:
            (self.path / link).unlink(missing_ok=True)
        for name in ("run.json", "history.json", "history.jsonl", "history.png", "steps.jsonl"):
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self.path / "checkpoints", ignore_errors=True)

    def check_signature(self, current: dict, *, resume: bool) -> None:
        """Compare with the stored run configuration; raise ``TrainingError`` naming the
        differences (before anything is written)."""
        stored_path = self.path / "run.json"
        if not resume or not stored_path.is_file() or not self.has_checkpoint():
            return
        try:
            stored = json.loads(stored_path.read_text())
        except (OSError, ValueError):
            warnings.warn(
                f"{stored_path} is unreadable; the stored configuration is not checked.",
                stacklevel=2,
            )
            return
        current = json.loads(dumps(current))
        # run folders written before the hyperparameters (or class names) were recorded:
        # those are not compared
        current = {
            k: v
            for k, v in current.items()
            if k in stored or (HYPER not in k and k != "train_classes")
        }
        diff = differences(stored, current)
        if diff:
            raise TrainingError(
                f"Cannot resume the run in {self.path}: it was started with another "
                f"configuration. Differences: {'; '.join(diff)}. A resume continues the "
                "same run (another learning rate or optimizer would not reach the weights "
                "the stored run would have). Pass checkpoint=eqxtl.Checkpoint(out_dir, "
                "resume=False) to start over (its checkpoints are deleted), or use another "
                "out_dir (e.g. starting from out_dir/best). Nothing was written."
            )

    def write_signature(self, current: dict) -> None:
        self._write_text("run.json", dumps(current, indent=1))

    # ------------------------------------------------------------------ checkpoints

    def has_checkpoint(self) -> bool:
        return any((self.path / link / META).is_file() for link in LINKS)

    def save(self, links: tuple[str, ...], staged: Path, model, state, meta: dict) -> Path:
        """Complete the checkpoint ``staged`` (from ``stage``, holding the training state)
        with ``model`` and ``state`` gathered (``save_pretrained``'s files; with adapters,
        the merged model and PEFT's files beside it) and ``meta``, rename it into
        ``checkpoints/`` and point ``links`` (``"last"``, ``"best"``) at it."""
        with sigint_deferred():
            return self._save(links, staged, model, state, meta)

    def _save(self, links, staged: Path, model, state, meta: dict) -> Path:
        from ..io.pretrained import save_pretrained
        from ..tuning.adapters import has_adapters, merge_lora, save_adapter

        ckpts = self.path / "checkpoints"
        name = f"step-{meta['step']}-{time.time_ns():x}"
        try:
            if has_adapters(model):
                # the merged model (what from_pretrained reads), the adapters beside it as
                # PEFT's files; resuming reads the adapted model from the training state
                save_pretrained(merge_lora(model), state, staged)
                heads = ["head"] if hasattr(model, "head") else []
                save_adapter(model, staged, modules_to_save=heads)
            else:
                save_pretrained(model, state, staged)
            (staged / META).write_text(dumps(meta, indent=1))
            _fsync_tree(staged)
            os.rename(staged, ckpts / name)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        _fsync_dir(ckpts)
        for link in links:
            self._link(link, ckpts / name)
        self._collect()
        return ckpts / name

    def _link(self, link: str, target: Path) -> None:
        tmp = self.path / f".{link}.link"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(os.path.relpath(target, self.path), tmp)
        os.replace(tmp, self.path / link)  # atomic: the old link or the new one
        _fsync_dir(self.path)

    def _collect(self) -> None:
        """Delete checkpoint directories that no link points to."""
        ckpts = self.path / "checkpoints"
        keep = {(self.path / link).resolve() for link in LINKS if (self.path / link).exists()}
        for p in ckpts.iterdir():
            if not p.name.startswith(".") and p.resolve() not in keep:
                shutil.rmtree(p, ignore_errors=True)

    def load(self, like_for_meta, mesh=None) -> tuple[Any, dict, str] | None:
        """The newest readable checkpoint: ``last``, or ``best`` when ``last`` is corrupt
        (with a warning). ``like_for_meta(meta)`` gives the pytree to read into; its arrays
        are placed on ``mesh`` (``train_state.read``). ``None`` when there is none;
        ``TrainingError`` when every one is unreadable or the mesh cannot hold the state.
        Every process calls it."""
        errors = []
        for link in LINKS:
            path = self.path / link
            if not path.exists():
                continue
            try:
                meta = json.loads((path / META).read_text())
                if (path / OLD_TRAIN_STATE).is_file():
                    with open(path / OLD_TRAIN_STATE, "rb") as f:
                        tree = eqx.tree_deserialise_leaves(f, like_for_meta(meta))
                else:
                    tree = train_state.read(
                        path / TRAIN_STATE, like_for_meta(meta), mesh, self.path
                    )
                if link != "last":
                    why = "; ".join(errors) or "last/ is missing"
                    warnings.warn(
                        f"Resuming from {link}/ (step {meta['step']}): {why}. Training "
                        "continues from there.",
                        stacklevel=2,
                    )
                return tree, meta, link
            except TrainingError:
                raise
            except Exception as e:  # truncated or corrupt files raise many error types
                errors.append(f"{link}/ is unreadable ({type(e).__name__}: {e})")
        if errors:
            raise TrainingError(
                f"Cannot resume the run in {self.path}: {'; '.join(errors)}. Pass "
                "eqxtl.Checkpoint(out_dir, resume=False) to start over, or use another out_dir."
            )
        return None

    # ------------------------------------------------------------------ logs

    def _write_text(self, name: str, text: str) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.path / name)

    def write_history(
        self, history: list[dict], new=(), *, steps=None, restart: bool = False
    ) -> None:
        """``history.json`` (whole), ``history.jsonl`` (``new`` records appended; with
        ``restart`` rewritten from ``history``) and ``history.png`` (with ``steps``, the
        per-step training losses)."""
        self._write_text("history.json", dumps(history, indent=1))
        self.plot(history, steps or [])
        if restart:
            self._write_text("history.jsonl", "".join(dumps(r) + "\n" for r in history))
            return
        with open(self.path / "history.jsonl", "a") as f:
            for record in new:
                f.write(dumps(record) + "\n")

    def read_steps(self, up_to: int) -> list[dict]:
        """The per-step losses in ``steps.jsonl`` up to step ``up_to`` (a resume drops
        the later ones, which the run repeats), rewriting the file to match."""
        path = self.path / "steps.jsonl"
        out = []
        if path.is_file() and up_to > 0:
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:  # a line cut by a kill
                    continue
                if record.get("step", up_to + 1) <= up_to:
                    out.append(record)
        self._write_text("steps.jsonl", "".join(dumps(r) + "\n" for r in out))
        return out

    def append_steps(self, records: list[dict]) -> None:
        with open(self.path / "steps.jsonl", "a") as f:
            for record in records:
                f.write(dumps(record) + "\n")

    def plot(self, history: list[dict], steps: list[dict]) -> None:
        if not history and not steps:
            return
        from .._util.plot import plot_history

        try:
            plot_history(history, self.path / "history.png", steps=steps)
        except ImportError:  # matplotlib is an optional extra (plot)
            return


@eqx.filter_jit
def _finite(tree) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))]
    return finite.all_finite(leaves)


def all_finite(tree) -> bool:
    """Whether every floating-point array of ``tree`` is finite (one device sync)."""
    return bool(_finite(tree))
