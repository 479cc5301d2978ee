#!/usr/bin/env bash
# The wheels a lent GPU machine needs to run sectune (it has torch, numpy, pandas, scikit-learn, matplotlib, safetensors,
# tokenizers, psutil, jinja2, pytest there, and no package index): the versions this checkout's .venv holds, for the
# machine's CPython 3.12, into .whl/ (git-ignored through .git/info/exclude), with bitsandbytes cut to its CUDA 13 and
# CPU libraries (43 MB -> 7 MB: the call's working tree is capped at 64 MiB). Then, on the machine:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# and bench/gpu_check.sh. Session 28 (2026-12-05) ran it so on an H100 (torch 2.11.0+cu130 there).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
ver() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
PKGS="transformers trl peft accelerate hydra-core omegaconf datasets dill multiprocess xxhash jsonschema
      jsonschema-specifications referencing rpds-py json_repair kernels tomlkit huggingface_hub httpx2 httpcore2
      truststore idna click regex bitsandbytes pytest-timeout"
for p in $PKGS; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$p==$(ver "$p")"
done
# antlr4 (hydra's parser runtime) is published as a source archive only: build its pure-Python wheel here
python3 -m pip download -q --no-deps --no-binary=:all: -d /tmp/sectune_sdist "antlr4-python3-runtime==$(ver antlr4-python3-runtime)"
python3 -m pip wheel -q --no-deps -w .whl /tmp/sectune_sdist/antlr4*.tar.gz
python3 - <<'PY'
import glob, re, zipfile
src = glob.glob(".whl/bitsandbytes-*.whl")[0]
drop = re.compile(r"bitsandbytes/libbitsandbytes_(cuda1[12]\d|rocm\d+|xpu\d+)\.so$")
with zipfile.ZipFile(src) as zi, zipfile.ZipFile(src + ".tmp", "w", zipfile.ZIP_DEFLATED) as zo:
    for info in zi.infolist():
        if drop.search(info.filename):
            continue
        data = zi.read(info.filename)
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"\n".join(l for l in data.split(b"\n") if not drop.search(l.split(b",")[0].decode()))
        zo.writestr(info, data)
import os; os.replace(src + ".tmp", src)
PY
du -sh .whl
