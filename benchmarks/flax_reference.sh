#!/usr/bin/env bash
# Build (once) a separate venv with the Flax reference stack and run flax_reference.py in it.
#
# transformers<5 (the last line with Flax models) needs huggingface_hub<1, which cannot share
# eqxtl's environment (huggingface_hub 2.x), hence a venv of its own under $TMPDIR.
# It is kept between runs (reused when it imports); FLAX_VENV_FRESH=1 rebuilds it.
# JAX_PIN=<version> pins jax/jaxlib (run_all.py passes eqxtl's own version, so that both
# sides run the same XLA); without it pip takes the newest.
#
#   bash benchmarks/flax_reference.sh [--models clip resnet50] [--workloads ...] [--quick]
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${FLAX_VENV:-${TMPDIR:-/tmp}/eqxtl-flax-reference-venv}"
PYTHON_FOR_VENV="${PYTHON_FOR_VENV:-python3}"

if [[ "${FLAX_VENV_FRESH:-0}" == "1" ]]; then
  rm -rf "$VENV"
fi

if ! "$VENV/bin/python" -c "import flax, optax, transformers; transformers.FlaxCLIPVisionModel" \
    >/dev/null 2>&1; then
  echo "flax_reference.sh: building $VENV ..." >&2
  rm -rf "$VENV"
  "$PYTHON_FOR_VENV" -m venv "$VENV"
  jax_spec="jax"
  if [[ -n "${JAX_PIN:-}" ]]; then
    jax_spec="jax[cpu]==${JAX_PIN}"
  fi
  "$VENV/bin/pip" install --quiet "transformers>=4.40,<5" "huggingface_hub<1" flax optax \
    "$jax_spec" >&2
  "$VENV/bin/python" -c "import flax, jax, transformers; print('flax', flax.__version__, \
'jax', jax.__version__, 'transformers', transformers.__version__)" >&2
fi

exec "$VENV/bin/python" "$HERE/flax_reference.py" "$@"
