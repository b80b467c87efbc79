#!/usr/bin/env bash
# The check to run when a GPU machine is lent (one call, about 5 minutes): following a checkpoint's
# generation config on CUDA in bfloat16, and what it costs at real vocabulary size.
#   1. bench.penalty: float32 cast + repetition penalty per verify, Qwen2.5-VL-7B's LM head
#      (hidden 3584, vocabulary 152,064) at batch 1-128, against the LM head itself.
#   2. bench.speedup on the demo models with the Qwen release's repetition penalty (1.05),
#      plain decoding vs FLASH in one run, identical-output rate on CUDA.
#   3. bench.real_shape: Qwen2.5-VL-7B's full text model (28 layers, random weights) in
#      bfloat16, plain decoding against FLASH at oracle acceptance 3.2, batch 1-64.
#   4. bench.train_step: one drafter-training example at 7B shape (the training cost formula).
# The machine's image has torch but an older transformers; carry the wheels flashcap pins in .wheels/
# (e.g. `pip download transformers==5.23.0 -d .wheels --no-deps`, listed in .git/info/exclude) and name
# .wheels in the run's carry. Results land in $OUT.
set -euo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-out/device}
mkdir -p "$OUT"
if [ -d .wheels ]; then python3 -m pip install -q --no-deps .wheels/*.whl; fi
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
python3 -m bench.penalty --device cuda --dtype bfloat16 --batch-sizes 1,16,64,128 --repeats 20 \
    --out "$OUT/penalty-cuda-bf16.json" | tee "$OUT/penalty.md"
python3 -m bench.speedup --device cuda --dtype bfloat16 --rendered --clips 32 --batch-sizes 1,16,32 \
    --repetition-penalty 1.05 --out "$OUT/speedup-cuda-bf16-penalty.json" | tee "$OUT/speedup.md"
python3 -m bench.real_shape --device cuda --dtype bfloat16 --layers 28 --batch-sizes 1,8,32,64 \
    --acceptance 3.2 --out "$OUT/real-shape-cuda-bf16.json" | tee "$OUT/real-shape.md"
python3 -m bench.train_step --device cuda --repeats 5 --out "$OUT/train-step-7b-cuda.json"
