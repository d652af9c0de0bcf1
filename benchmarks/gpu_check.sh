#!/usr/bin/env bash
# Run benchmarks/gpu_check.py on an offline GPU machine that has torch (and torchvision) and nothing else.
#
#     bash benchmarks/gpu_wheels.sh                          # first, where there is network
#     bash benchmarks/gpu_check.sh --out gpu-check           # then, on the GPU machine
#     bash benchmarks/gpu_check.sh --budget-s 420 --out "$OUT/gpu-check"
#
# Makes a virtual environment with --system-site-packages (so the machine's CUDA build of torch is
# used as it is), installs the carried wheels (benchmarks/.wheels, or $WHEELS_DIR) with --no-index,
# installs flowalign from this source tree (editable, no dependencies, no build isolation), and runs
# gpu_check.py with the arguments given. The environment is kept ($FLOWALIGN_GPU_VENV, default
# /tmp/flowalign-gpu-venv), so a second run starts at once. pip reads no configuration file here: the install sees the wheel folder
# and nothing else.
#
# Variables: PYTHON (the interpreter that holds torch, default python3), WHEELS_DIR,
# FLOWALIGN_GPU_VENV.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS_DIR:-$ROOT/benchmarks/.wheels}
VENV=${FLOWALIGN_GPU_VENV:-/tmp/flowalign-gpu-venv}

if [ ! -f "$WHEELS/requirements.txt" ]; then
    echo "gpu_check.sh: no $WHEELS/requirements.txt; run 'bash benchmarks/gpu_wheels.sh' where there is network" >&2
    exit 2
fi
"$PYTHON" - <<'EOF'
import sys

try:
    import torch
    import torchvision
except ImportError as err:
    sys.exit(f"gpu_check.sh: this Python has no {err.name}; it must come with the machine (PYTHON=...)")
cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"torchvision {torchvision.__version__}, {cuda}")
EOF

start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
    # a Python without ensurepip (e.g. one made by uv) makes the environment without pip: its own pip
    # then installs into it (pip --python)
    "$PYTHON" -m venv --system-site-packages "$VENV" 2>/dev/null \
        || { rm -rf "$VENV" && "$PYTHON" -m venv --system-site-packages --without-pip "$VENV"; }
fi
# When $PYTHON is itself a virtual environment, --system-site-packages reaches its base interpreter's
# packages, not the environment that holds torch: add that one's site-packages (after the new ones).
"$PYTHON" - "$VENV" <<'EOF'
import subprocess
import sys
import sysconfig
from pathlib import Path

if sys.prefix != sys.base_prefix:
    paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    new_site = subprocess.check_output(
        [f"{sys.argv[1]}/bin/python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
    ).strip()
    pth = Path(new_site, "_flowalign_base_env.pth")
    if not pth.exists():
        pth.write_text("".join(f"import site; site.addsitedir({p!r})\n" for p in paths))
        print(f"{sys.prefix} is a virtual environment: its packages are visible in {sys.argv[1]}")
EOF
if "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    pip=("$VENV/bin/python" -m pip)
else
    pip=("$PYTHON" -m pip --python "$VENV/bin/python")
fi
pip_install=(env PIP_CONFIG_FILE=/dev/null "${pip[@]}" install -q --no-index --find-links "$WHEELS" --disable-pip-version-check)
"${pip_install[@]}" -r "$WHEELS/requirements.txt"
if ! "${pip_install[@]}" --no-deps --no-build-isolation -e "$ROOT" >"$VENV/flowalign-install.log" 2>&1; then
    echo "gpu_check.sh: editable install of flowalign failed ($VENV/flowalign-install.log); importing it from $ROOT" >&2
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
echo "environment ready in $(($(date +%s) - start)) s ($VENV)"

cd "$ROOT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/python" benchmarks/gpu_check.py "$@"
