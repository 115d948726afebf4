#!/usr/bin/env bash
# The one prepared GPU check (run on a lent GPU machine from the repository root), meant to
# finish in under 8 minutes (the timeouts below add up to 480 s):
#   1. the CUDA unit test (GPU factors equal the CPU ones);
#   2. the pipeline's stages on a LLaMA-2-7B-shaped bf16 checkpoint built there
#      (benchmarks/gpu_pipeline.py: build, streamed init on the GPU, training from that init
#      with bf16 and gradient checkpointing for 20 steps, evaluation, conversion + verify;
#      peak memory per stage, useful tokens/s, an estimate of model FLOPs utilisation);
#   3. useful tokens/s and peak memory of the project's loop against plain PEFT + Trainer on
#      that same checkpoint (benchmarks/train_tokens.py, bf16, gradient checkpointing);
#   4. FSDP through accelerate on the GPU (the engine accelerate does not run on CPU);
#   5. the init shared out across processes on the machine's CPU cores (1 vs 4 processes).
# Earlier checks' SVD-vs-reference and step-cost figures are in README (benchmarks/svd_init.py,
# benchmarks/train_step.py); run those separately when they need refreshing.
# Wheels the machine lacks (pydantic, which the tests' conftest needs) can be carried in .whl/
# (git-ignored: `run` with carry [".whl"]); logs go to $OUT (default /tmp/gpu-check).
set -uo pipefail
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu-check}
WORK=${WORK:-/tmp/gpu-pipeline}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  # --find-links picks the wheels that fit this Python (e.g. pydantic_core for cp310..cp313)
  python3 -m pip install -q --no-index --find-links .whl --no-compile --no-cache-dir --target /tmp/site \
    $(ls .whl | sed -E 's/-[0-9].*//' | sort -u)
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
started=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - started )) s in)"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import sys, torch, transformers, peft; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"

step "CUDA unit test"
timeout 45 python3 -m pytest -q -p no:cacheprovider tests/test_initialize.py -k cuda > "$OUT/pytest.txt" 2>&1
tail -3 "$OUT/pytest.txt"

step "pipeline stages on a 7B-shaped bf16 checkpoint"
timeout 230 python3 benchmarks/gpu_pipeline.py --shape 7b --steps 20 --work "$WORK" > "$OUT/gpu_pipeline.log" 2>&1
grep -E "^(build|init|train|evaluate|convert):|^\{|Error|error" "$OUT/gpu_pipeline.log" | tail -8

step "tokens/s against plain PEFT + Trainer (same checkpoint)"
timeout 120 python3 benchmarks/train_tokens.py --model "$WORK/base" --steps 10 --repeat 1 --warmup 0 \
  --micro-batch-size 8 --batch-size 8 --max-length 512 --dtype bfloat16 --bf16 --gradient-checkpointing \
  --cache-dir "$WORK/svd-cache" \
  > "$OUT/train_tokens.log" 2>&1
grep -vE "it/s\]|matrix/s" "$OUT/train_tokens.log" | tail -4

step "FSDP on the GPU (accelerate, 1 process)"
timeout 45 python3 -m accelerate.commands.launch --config_file configs/accelerate/fsdp.yaml --num_processes 1 \
  --mixed_precision bf16 benchmarks/gpu_pipeline.py --fsdp-check --work "$WORK" > "$OUT/fsdp.log" 2>&1
grep -E "^\{|Error|error" "$OUT/fsdp.log" | tail -4

step "init shared out: 1 vs 4 processes on the CPU cores"
timeout 40 python3 benchmarks/init_processes.py --processes 4 --layers 4 --repeat 1 > "$OUT/init_processes.log" 2>&1
grep -vE "it/s\]|matrix/s" "$OUT/init_processes.log" | tail -2
step "done"
