#!/usr/bin/env bash
# The one prepared GPU check (run on a lent GPU machine from the repository root):
# the CUDA unit test, SVD init at full LLaMA-2-7B shapes against the float32 SVD reference,
# and the training-step cost of MiLoRA against LoRA on the same 7B-shaped model.
# Wheels the machine lacks can be carried in .whl/; logs go to $OUT (default /tmp/gpu-check).
set -uo pipefail
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_initialize.py -k cuda 2>&1 | tail -2 | tee "$OUT/pytest.txt"
timeout 330 python3 benchmarks/svd_init.py --device cuda --full-size --accuracy-sample 5 --cache-dir /tmp/svd-cache \
  > "$OUT/svd_init.log" 2>&1
grep -v "matrix/s" "$OUT/svd_init.log" | tail -8
timeout 200 python3 benchmarks/train_step.py --device cuda --full-size --cache-dir /tmp/svd-cache \
  > "$OUT/train_step.log" 2>&1
grep -v "matrix/s" "$OUT/train_step.log" | tail -4
