"""Multi-process data parallel ``fit`` on JAX's own runtime: 2 processes on localhost CPU
(``jax.distributed`` with gloo collectives), 1 device each, against 1 process with the same
global batch. Each process reads its part of every batch; process 0 alone writes the run
folder; a resume continues in both; processes that disagree on the data are an error."""

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


def _run(count: int, out_dir, steps: int, n_train=(24, 24)) -> list[dict]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    port = _free_port()
    logs = [tempfile.TemporaryFile("w+") for _ in range(2 * count)]  # no pipe to fill up
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests._multiprocess_worker",
                str(i),
                str(count),
                str(port),
                str(out_dir),
                str(steps),
                str(n_train[i]),
            ],
            stdout=logs[2 * i],
            stderr=logs[2 * i + 1],
            text=True,
            env=env,
            cwd=ROOT,
        )  # fmt: skip
        for i in range(count)
    ]
    outs = []
    for i, p in enumerate(procs):
        p.wait(timeout=600)
        stdout, stderr = (_read(logs[2 * i]), _read(logs[2 * i + 1]))
        lines = stdout.strip().splitlines()
        assert lines, stderr[-3000:]
        outs.append({"rc": p.returncode, **json.loads(lines[-1]), "stderr": stderr})
    return outs


def _read(f) -> str:
    f.seek(0)
    text = f.read()
    f.close()
    return text


def _assert_same_weights(a: dict, b: dict) -> None:
    for x, y in zip(a["params"], b["params"], strict=True):
        np.testing.assert_allclose(np.array(x), np.array(y), rtol=1e-4, atol=1e-5)


def test_two_processes_match_one_write_once_and_resume(tmp_path):
    (single,) = _run(1, "-", 6)
    # 4 steps, then a resume to 6 in both processes
    first = _run(2, tmp_path / "run", 4)
    assert [o["rc"] for o in first] == [0, 0], first[1]["stderr"][-3000:]
    assert (tmp_path / "run" / "saves.log").read_text().split() == ["0", "0"]  # steps 2, 4
    assert len(list((tmp_path / "run" / "checkpoints").iterdir())) == 1
    resumed = _run(2, tmp_path / "run", 6)
    assert [o["rc"] for o in resumed] == [0, 0], resumed[1]["stderr"][-3000:]
    assert {o["step"] for o in resumed} == {6}
    # identical in both processes, and equal to one process with the same global batch
    _assert_same_weights(resumed[0], resumed[1])
    _assert_same_weights(resumed[0], single)
    # evaluation sums are reduced over both processes: the same test metrics as one process
    for a, b in zip(resumed[0]["history"], single["history"], strict=True):
        assert a["step"] == b["step"]
        np.testing.assert_allclose(a["test_loss"], b["test_loss"], rtol=1e-4)
        assert a["test_accuracy"] == b["test_accuracy"]
    assert (tmp_path / "run" / "saves.log").read_text().split() == ["0"] * 3


def test_processes_disagreeing_on_the_data_length_is_an_error(tmp_path):
    outs = _run(2, tmp_path / "run", 2, n_train=(24, 25))
    for o in outs:
        assert o["rc"] == 3 and o["error"] == "TrainingError", o
        assert "disagree on the length of train_data" in o["message"]
    assert not (tmp_path / "run" / "checkpoints").exists()
