#!/usr/bin/env bash
# Run here, once, before tests/benchmarks/gpu_checks.sh goes to a lent GPU machine: that machine reaches no package
# index, and its image holds torch (CUDA), accelerate, safetensors and numpy but other versions of the rest. This
# downloads the pure-Python wheels trainer_core runs with, at constraints.txt's versions, into .whl/ (ignored by git
# through .git/info/exclude; ~20 MB, within the device tool's 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
pins=()
for name in transformers tokenizers peft accelerate; do  # the image's huggingface_hub (1.33) meets transformers' >=1.31
  pins+=("$(grep -i "^${name}==" constraints.txt)")
done
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${pins[@]}"
ls .whl
