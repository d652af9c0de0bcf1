#!/usr/bin/env bash
# Download, on a machine with network, the wheels that benchmarks/gpu_check.py needs besides torch,
# for an offline GPU machine that has a CUDA build of torch (and torchvision) and nothing else.
#
#     bash benchmarks/gpu_wheels.sh                 # -> benchmarks/.wheels (git-ignored), sizes printed
#     GPU_PYTHON=3.11 bash benchmarks/gpu_wheels.sh # for a GPU machine with another Python
#
# The set is the dependency closure of the packages gpu_check.py imports (diffusers, transformers,
# accelerate, peft, safetensors, open_clip_torch with timm and ftfy, huggingface_hub, tokenizers,
# regex, pyyaml, psutil, tqdm), read from this checkout's .venv at the versions the tests run with
# (checked against constraints.txt), minus what torch and torchvision themselves require: a
# torchvision wheel must match the GPU machine's torch build, so neither is carried, and where they
# are installed so are their requirements (numpy, pillow, filelock, fsspec, typing-extensions, sympy,
# networkx, jinja2, the CUDA libraries). WITH_TORCHVISION_DEPS=1 carries numpy and pillow as well
# (22.7 MiB more). Binary wheels are fetched for CPython $GPU_PYTHON on manylinux x86_64; setuptools
# and wheel come along so that flowalign installs from the source tree (editable) everywhere.
# benchmarks/gpu_check.sh installs from this folder with --no-index.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
GPU_PYTHON=${GPU_PYTHON:-3.12}
DEST=${WHEELS_DIR:-benchmarks/.wheels}
export WITH_TORCHVISION_DEPS=${WITH_TORCHVISION_DEPS:-0}

rm -rf "$DEST"
mkdir -p "$DEST"

# name==version of every runtime dependency, from the installed metadata (markers for $GPU_PYTHON)
"$PY" - "$GPU_PYTHON" >"$DEST/requirements.txt" <<'EOF'
import os
import re
import sys
from importlib import metadata

from packaging.requirements import Requirement

ROOTS = [
    "diffusers", "transformers", "accelerate", "peft", "safetensors", "open_clip_torch", "timm", "ftfy",
    "huggingface_hub", "tokenizers", "regex", "pyyaml", "psutil", "tqdm",
]
version = sys.argv[1]
marker_env = {"extra": "", "python_version": version, "python_full_version": f"{version}.0"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots, skip=frozenset()) -> dict[str, str]:
    """{name: installed version} of ``roots`` and everything they require (``skip`` not entered)."""
    found: dict[str, str] = {}
    todo = [norm(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in found or name in skip:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            if name.startswith(("nvidia-", "cuda-")):  # CUDA libraries this checkout's torch build may lack
                continue
            sys.exit(f"gpu_wheels: {name} is not installed in this environment (pip install -e . first)")
        found[name] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate(marker_env):
                todo.append(norm(req.name))
    return found


on_gpu_machine = set(closure(["torch", "torchvision"]))
if os.environ.get("WITH_TORCHVISION_DEPS") == "1":
    on_gpu_machine -= {"numpy", "pillow"}
    ROOTS += ["numpy", "pillow"]
for name, ver in sorted(closure(ROOTS, skip=frozenset(on_gpu_machine)).items()):
    print(f"{name}=={ver}")
print("setuptools>=68")
print("wheel")
EOF

echo "downloading $(wc -l <"$DEST/requirements.txt") wheels for CPython $GPU_PYTHON (manylinux x86_64) into $DEST"
pyver=${GPU_PYTHON/./}
"$PY" -m pip download -q --no-deps --only-binary=:all: -c constraints.txt \
    --python-version "$GPU_PYTHON" --implementation cp --abi "cp$pyver" --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform any \
    -r "$DEST/requirements.txt" -d "$DEST"

"$PY" - "$DEST" <<'EOF'
import sys
from pathlib import Path

wheels = sorted(Path(sys.argv[1]).glob("*.whl"), key=lambda p: -p.stat().st_size)
mib = [p.stat().st_size / 2**20 for p in wheels]
print("\nlargest wheels:")
for path, size in list(zip(wheels, mib))[:8]:
    print(f"  {size:7.2f} MiB  {path.name}")
print(f"wheel folder: {len(wheels)} wheels, {sum(mib):.1f} MiB (device carry limit: 64 MiB with the working tree)")
EOF
