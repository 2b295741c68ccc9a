#!/usr/bin/env bash
# One-command accelerator benchmark: eqxtl vs PyTorch (eager and torch.compile) on one GPU.
#
#   bash benchmarks/accelerator.sh              # install (first time), run, print the table
#   bash benchmarks/accelerator.sh --dry-run    # print the plan: what it installs and runs
#   bash benchmarks/accelerator.sh --cpu-smoke  # the same code path, tiny, on the CPU, with
#                                               # the current python (no install); for CI
#
# On a bare Linux x86_64 machine with an NVIDIA driver: creates a venv
# ($EQXTL_ACCEL_VENV, default $TMPDIR/eqxtl-accelerator-venv; kept and reused), installs
# pinned jax[cuda13] (jax[cuda12] for a driver older than 580) and torch (PyPI's Linux
# x86_64 torch wheel is the CUDA 13.0 build), then runs benchmarks/accelerator.py:
# CLIP ViT-B/32 and ResNet-50, f32 and bf16, batch 128, written to
# benchmarks/results/<device>.jsonl. The runs stop starting after --budget-s (default 420 s),
# so that the benchmark itself stays under 8 minutes; installing is extra (a few GB of CUDA
# wheels). Other arguments go to accelerator.py (--batch-size, --workloads, --out, ...).
#
# Environment: EQXTL_ACCEL_VENV (venv path), EQXTL_ACCEL_FRESH=1 (rebuild it), TORCH_SPEC
# (another torch requirement, e.g. a CUDA 12 build from PyTorch's own index together with
# PIP_EXTRA_INDEX_URL), PYTHON (the interpreter for the venv, --dry-run and --cpu-smoke).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${EQXTL_ACCEL_VENV:-${TMPDIR:-/tmp}/eqxtl-accelerator-venv}"

# The versions the CPU benchmarks and tests run with (pyproject's test extra, the lead's venv).
JAX_VERSION=0.10.2
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
OTHERS=(
  "equinox==0.13.8" "optax==0.2.8" "jaxtyping==0.3.11" "transformers==5.24.0"
  "safetensors==0.8.0" "huggingface_hub==2.4.0" "numpy==2.4.6" "pillow==13.0.0" "tqdm==4.70.1"
)

mode=run
for arg in "$@"; do
  case "$arg" in
    --dry-run) mode=dry ;;
    --cpu-smoke) mode=smoke ;;
  esac
done

if [[ "$mode" == smoke ]]; then
  exec "$PYTHON" "$HERE/accelerator.py" "$@"
fi

driver=""
if command -v nvidia-smi >/dev/null 2>&1; then
  driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1 || true)"
fi
major="${driver%%.*}"
if [[ -n "$major" && "$major" =~ ^[0-9]+$ && "$major" -lt 580 ]]; then
  jax_extra=cuda12  # CUDA 13 needs driver >= 580
else
  jax_extra=cuda13
fi
PACKAGES=("jax[$jax_extra]==$JAX_VERSION" "$TORCH_SPEC" "${OTHERS[@]}")

if [[ "$mode" == dry ]]; then
  echo "driver: ${driver:-none found}"
  echo "venv: $VENV ($([[ -x "$VENV/bin/python" ]] && echo exists, reused || echo to create))"
  echo "install: $VENV/bin/pip install ${PACKAGES[*]}"
  if [[ "$jax_extra" == cuda12 && "$TORCH_SPEC" == "torch==2.13.0" ]]; then
    echo "warning: driver $driver < 580: PyPI's torch 2.13.0 (CUDA 13) will not run;" \
      "set TORCH_SPEC to a CUDA 12 build"
  fi
  exec "$PYTHON" "$HERE/accelerator.py" "$@"
fi

if [[ -z "$driver" ]]; then
  echo "accelerator.sh: nvidia-smi finds no NVIDIA GPU; for a CPU check run --cpu-smoke." >&2
  exit 2
fi
if [[ "$jax_extra" == cuda12 && "$TORCH_SPEC" == "torch==2.13.0" ]]; then
  echo "accelerator.sh: driver $driver is older than 580: PyPI's torch==2.13.0 is a CUDA 13" \
    "build and will not run. Set TORCH_SPEC (and PIP_EXTRA_INDEX_URL) to a CUDA 12 build." >&2
  exit 2
fi

start=$SECONDS
if [[ "${EQXTL_ACCEL_FRESH:-0}" == "1" ]]; then
  rm -rf "$VENV"
fi
check='import jax, torch, equinox, optax, transformers
assert jax.devices()[0].platform == "gpu", jax.devices()
assert torch.cuda.is_available()'
if ! "$VENV/bin/python" -c "$check" >/dev/null 2>&1; then
  echo "accelerator.sh: installing into $VENV: ${PACKAGES[*]}" >&2
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet "${PACKAGES[@]}"
  "$VENV/bin/python" -c "$check"
fi
echo "accelerator.sh: environment ready after $((SECONDS - start)) s" >&2
# eqxtl itself comes from this checkout (the benchmark scripts put it on sys.path).
"$VENV/bin/python" "$HERE/accelerator.py" "$@"
echo "accelerator.sh: $((SECONDS - start)) s in all (installing included)" >&2
