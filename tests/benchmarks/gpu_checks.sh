#!/usr/bin/env bash
# Issue 15's GPU figures in one call of the device tool (a lent H100/H200; minutes of device time in all):
#   here, once:     tests/benchmarks/gpu_wheels.sh                (the wheels that machine lacks, into .whl/)
#   on the device:  run(command="bash tests/benchmarks/gpu_checks.sh", carry=[".whl"], timeout_s=540)
# Each step's output lands in $OUT/<step>.txt; the tables also go to stdout. Then copy the tables into BENCHMARKS.md
# with the machine (versions.txt) and the date.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/gpu_checks}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_checks: installing .whl/ failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, transformers, accelerate, peft; print('torch', torch.__version__, 'CUDA', torch.version.cuda,
'| transformers', transformers.__version__, '| accelerate', accelerate.__version__, '| peft', peft.__version__)"
} 2>&1 | tee "$out/versions.txt"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 1

failed=0
step() {  # step NAME SECONDS ARGS...: one bench_mfu.py run, its tables printed, its whole log kept
  local name=$1 limit=$2; shift 2
  echo "== $name: bench_mfu.py $*"
  timeout "$limit" python3 tests/benchmarks/bench_mfu.py "$@" >"$out/$name.txt" 2>&1
  local rc=$?
  grep -E '^\||^NVIDIA|^CPU' "$out/$name.txt"
  if [ $rc -ne 0 ]; then failed=1; echo "== $name failed (exit $rc):"; tail -n 25 "$out/$name.txt"; fi
}
step eager 150                                   # BERT-base, batch 32, MRPC-shaped; GPT-2 124M, packed 8 x 1024
step eager_bert_b128 90 --workloads bert --batch 128   # the same BERT at a batch that fills the GPU better
step compiled 240 --compile                      # both through torch.compile (inductor), lengths bucketed to 16
exit $failed
