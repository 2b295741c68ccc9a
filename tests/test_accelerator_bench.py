"""benchmarks/accelerator.sh: the plan (--dry-run), the CPU smoke run of the same code
path, and the MFU arithmetic of its table. No speed is asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "accelerator.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))

import accelerator  # noqa: E402

FRAMEWORKS = ("eqxtl", "torch", "torch-compile")
STEP_FIELDS = {
    "framework",
    "model",
    "workload",
    "batch",
    "dtype",
    "device",
    "sec_per_step",
    "compile_s",
    "first_call_s",
    "gflop_per_step",
    "peak_rss_mb",
    "round_sec_per_step",
}


def _run(*args, env=None, timeout=600):
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHON": sys.executable, **(env or {})},
        cwd=ROOT,
    )


def test_dry_run_prints_the_plan_and_installs_nothing(tmp_path):
    venv = tmp_path / "venv"
    out = _run("--dry-run", env={"EQXTL_ACCEL_VENV": str(venv)}, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "install:" in text and "jax[cuda1" in text and "torch==2.13.0" in text
    assert "batch 128" in text and "f32, bf16" in text
    children = [line for line in text.splitlines() if line.strip().startswith("child:")]
    assert len(children) == 6  # 3 frameworks x 2 dtypes
    assert sum("--compile" in c for c in children) == 2
    assert all("--batch-size 128" in c for c in children)
    # issue 22's rows: ViT-L/14 unrolled, scanned and PyTorch's; LoRA f32, int8 base and PEFT's
    extras = [line for line in text.splitlines() if line.strip().startswith("extra child:")]
    assert len(extras) == 6
    assert sum("clip_l14 --workloads full" in c and "--variant unrolled" in c for c in extras) == 1
    assert sum("--workloads lora" in c and "--variant int8-base" in c for c in extras) == 1
    assert sum("torch_reference.py" in c for c in extras) == 2
    assert not venv.exists()
    # no GPU here: the multi-device run says why it is skipped
    assert "multi-device run (data and fsdp meshes) skipped: 0 GPUs visible" in text


def test_extras_only_plans_issue_22s_rows_alone():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "accelerator.py"), "--dry-run"]
        + ["--extras-only", "--batch-size", "64"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert not [line for line in lines if line.strip().startswith("child:")]
    extras = [line for line in lines if line.strip().startswith("extra child:")]
    # CLIP-B/32's full step first (L/14's compile time is set against it), then the six
    assert len(extras) == 7 and "--models clip --workloads full" in extras[0]
    assert all("--batch-size 64" in c for c in extras)


def test_cpu_smoke_writes_the_records(tmp_path):
    out_file = tmp_path / "smoke.jsonl"
    out = _run("--cpu-smoke", "--out", str(out_file))
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in out_file.read_text().splitlines() if line.strip()]
    assert not [r for r in records if "error" in r or "skipped" in r]
    assert records[0]["kind"] == "run"
    assert [r["when"] for r in records if r.get("kind") == "peak"] == ["start", "end"]
    timed = [r for r in records if "sec_per_step" in r]
    steps = {(r["framework"], r["dtype"]): r for r in timed if "variant" not in r}
    variants = {(r["model"], r["variant"]) for r in timed if "variant" in r}
    assert variants == {("clip_l14", "unrolled"), ("clip", "int8-base")}
    assert "head+unrolled" in out.stdout and "head+int8-base" in out.stdout
    assert set(steps) == {(f, d) for f in FRAMEWORKS for d in ("f32", "bf16")}
    for (framework, dtype), r in steps.items():
        assert STEP_FIELDS <= set(r), (framework, dtype, STEP_FIELDS - set(r))
        assert r["batch"] == 2 and r["device"] == "cpu" and r["sec_per_step"] > 0
        assert r["model"] == "clip" and r["workload"] == "head"
        if framework != "torch":  # eager has nothing to compile
            assert r["compile_s"] is not None and r["compile_s"] >= 0
    assert steps["torch-compile", "f32"]["compile_backend"] == "aot_eager"
    assert "| model | workload | dtype |" in out.stdout


def test_multi_device_plan_needs_two_gpus():
    for n in (0, 1):
        command, why = accelerator.multi_device_plan(n, "out.jsonl", 128)
        assert command is None and f"{n} GPU" in why and "2 or more" in why
    command, why = accelerator.multi_device_plan(4, "out.jsonl", 128)
    assert why is None and command[1].endswith("sharding.py") and "--all-devices" in command
    assert command[command.index("--out") + 1] == "out.jsonl"
    _, why = accelerator.multi_device_plan(4, "out.jsonl", 2, cpu_smoke=True)
    assert "CPU smoke run" in why


def test_peaks_and_mfu():
    assert accelerator.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert accelerator.peak_tflops("NVIDIA H100 PCIe", "f32") == 378.0
    assert accelerator.peak_tflops("NVIDIA L40S", "bf16") == 362.0  # not the L4
    assert accelerator.peak_tflops("NVIDIA L4", "bf16") == 121.0
    assert accelerator.peak_tflops("NVIDIA A10G", "bf16") is None
    assert accelerator.peak_tflops("cpu", "f32") is None

    def rec(framework, dtype, sec, gflop):
        return {
            "framework": framework,
            "model": "clip",
            "workload": "full",
            "dtype": dtype,
            "batch": 128,
            "sec_per_step": sec,
            "compile_s": 1.0,
            "gflop_per_step": gflop,
        }

    # 989.4 GFLOP per step (PyTorch's count) in 10 ms: 98.94 TFLOP/s = 10% of a bf16 H100.
    records = [rec("torch", "f32", 0.02, 989.4), rec("eqxtl", "bf16", 0.01, 5000.0)]
    table = accelerator.summarize(records, "NVIDIA H100 80GB HBM3")
    row = next(line for line in table.splitlines() if "| bf16 |" in line)
    assert "| 98.9 | 10.0% |" in row  # eqxtl's MFU from PyTorch's FLOP count, not its own
    unknown = accelerator.summarize(records, "Some GPU")
    assert "achieved TFLOP/s only" in unknown and "%" not in unknown.split("\n", 2)[2]


@pytest.mark.parametrize("name", ["NVIDIA H200", "NVIDIA A100-SXM4-80GB"])
def test_slug(name):
    assert accelerator.slug(name) in ("nvidia-h200", "nvidia-a100-sxm4-80gb")
