"""Checkpoints of sharded training state, and ``fit`` over 2 processes x 4 devices.

ONE test (subprocesses and compilation dominate its time): 2 processes with 4 virtual CPU
devices each (``jax.distributed`` on localhost, gloo collectives) train a small ViT at
``fsdp=8`` for 2 steps (each process writes its own shards of the training state), then
resume to 3; then one process with 8 virtual devices trains the same run on 1 device and at
``fsdp=8``, stops after 2 steps and resumes on the same mesh, on 4 devices, and from the
run the 2 processes wrote (see tests/_sharded_worker.py)."""

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run(argvs: list[list[str]]) -> list[dict]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    logs = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in argvs]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests._sharded_worker", *argv],
            stdout=out,
            stderr=err,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for argv, (out, err) in zip(argvs, logs, strict=True)
    ]
    results = []
    for p, (out, err) in zip(procs, logs, strict=True):
        p.wait(timeout=600)
        out.seek(0)
        err.seek(0)
        lines, stderr = out.read().strip().splitlines(), err.read()
        assert p.returncode == 0 and lines, stderr[-3000:]
        results.append(json.loads(lines[-1]))
    return results


def _close(a: dict, b: dict) -> None:
    """Weights (and optimizer state) and per-step losses within relative 1e-5."""
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-5)
    assert len(a["params"]) == len(b["params"])
    for x, y in zip(a["params"], b["params"], strict=True):
        x, y = np.array(x), np.array(y)
        assert np.max(np.abs(x - y)) <= 1e-5 * np.max(np.abs(y)) + 1e-7


def test_sharded_checkpoints_resume_on_any_mesh_and_two_processes_match_one(tmp_path):
    port = str(_free_port())
    multi = _run([["multi", str(i), port, str(tmp_path)] for i in range(2)])
    (single,) = _run([["single", str(tmp_path)]])
    straight = single["straight"]
    assert len(straight["losses"]) == 3 and straight["resumed_from"] is None
    # 1 device, 1 process x 8 devices, 2 processes x 4 devices (resumed at step 2)
    _close(straight, single["one_device"])
    assert multi[0]["multi"]["resumed_from"] == multi[1]["multi"]["resumed_from"] == 2
    _close(multi[0]["multi"], straight)
    assert multi[0]["multi"]["params"] == multi[1]["multi"]["params"]
    # each process wrote its own shards of the training state
    assert multi[0]["writers"] == ["ocdbt.process_0", "ocdbt.process_1"]
    # a resume onto the same mesh is bit-exact
    assert single["resumed"]["resumed_from"] == 2
    assert single["resumed"]["losses"] == straight["losses"]
    for x, y in zip(single["resumed"]["params"], straight["params"], strict=True):
        np.testing.assert_array_equal(np.array(x), np.array(y))
    # onto another mesh (8 devices -> 4), and from 2 processes onto 1
    for other in ("four", "from_two_processes"):
        assert single[other]["resumed_from"] == 2
        _close(single[other], straight)
    # a mesh whose devices cannot hold the state: the mesh and the sizes, nothing trained
    message = single["small"]
    assert message is not None
    assert "onto the mesh {'data': 4, 'fsdp': 2}" in message
    assert "MiB on each device there" in message and "holds 1.0 MiB" in message
    assert "make_mesh(fsdp=N)" in message
