#!/usr/bin/env bash
# The check to run first when a GPU machine is lent (one call, under 10 minutes: 300 + 140 + 45 + 45
# + 60 s at most; each step has its own time limit so a slow one cannot starve the rest). Results
# land in $OUT.
#   1. bench.real_shape: Qwen2.5-VL-7B's full text model (28 layers, random weights, bfloat16, a
#      1,200-token prompt standing in for a video), eager vs compiled (inductor, CUDA graphs), plain
#      decoding vs FLASH at oracle acceptance 3.2 and 4.5, batch 1-128: ms per step beside the
#      memory-bandwidth floor, tokens/s, outputs checked equal.
#   2. bench.speedup on the demo models with the Qwen release's repetition penalty (1.05), eager and
#      compiled rows, plain decoding vs FLASH in one run, identical-output rate on CUDA.
#   3. bench.penalty: float32 cast + repetition penalty per verify at Qwen2.5-VL-7B's LM head.
#   4. bench.train_step: one drafter-training example at 7B shape (the training cost formula).
#   5. bench.moe_verify: a verify of 2-5 tokens against a one-token step on 8 of Qwen3-VL-30B-A3B's
#      48 layers (128 experts, top 8) and a dense model of its active size, batch 1 / 8 / 64.
# The machine's image has torch but an older transformers; carry the wheels flashcap pins in .wheels/
# (e.g. `pip download transformers==5.23.0 -d .wheels --no-deps`, listed in .git/info/exclude) and name
# .wheels in the run's carry. `SMOKE=1 bash bench/device_check.sh` runs every step tiny on a CPU.
set -euo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-out/device}
mkdir -p "$OUT"
if [ -d .wheels ]; then python3 -m pip install -q --no-deps .wheels/*.whl; fi
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
if [ "${SMOKE:-0}" = 1 ]; then  # the same commands, tiny, on the CPU (aot_eager: no kernel generation)
    DEV="--device cpu --dtype float32"; BACKEND=aot_eager
    SHAPE="--layers 1 --batch-sizes 1,2 --prompt-tokens 64 --max-new-tokens 8 --repeats 1"
    DEMO="--clips 2 --batch-sizes 1,2 --repeats 1 --warmup 0"; PEN="--batch-sizes 1,2 --repeats 2"
    TRAIN="--repeats 1 --hidden 256 --vocab 4096 --heads 4 --draft-vocab 512 --visual 64 --answer 16"
    MOE="--hidden 128 --layers 1 --experts 8 --active 2 --expert-width 32 --batch-sizes 1,2 --repeats 1 --prompt-tokens 16"
else
    DEV="--device cuda --dtype bfloat16"; BACKEND=inductor
    SHAPE="--layers 28 --batch-sizes 1,8,32,64,128 --prompt-tokens 1200 --max-new-tokens 64 --repeats 2"
    DEMO="--rendered --clips 32 --batch-sizes 1,16,32"; PEN="--batch-sizes 1,16,64,128 --repeats 20"; TRAIN="--repeats 5"
    MOE="--hidden 2048 --layers 8 --experts 128 --active 8 --expert-width 768 --batch-sizes 1,8,64 --repeats 10 --prompt-tokens 1024"
fi
timeout 300 python3 -m bench.real_shape $DEV $SHAPE --acceptance 3.2,4.5 --compile $BACKEND \
    --out "$OUT/real-shape.json" | tee "$OUT/real-shape.md" || echo "real_shape stopped: $?"
timeout 140 python3 -m bench.speedup $DEV $DEMO --repetition-penalty 1.05 --compile --compile-backend $BACKEND \
    --out "$OUT/speedup-penalty.json" | tee "$OUT/speedup.md" || echo "speedup stopped: $?"
timeout 45 python3 -m bench.penalty $DEV $PEN --out "$OUT/penalty.json" | tee "$OUT/penalty.md" || echo "penalty stopped: $?"
timeout 45 python3 -m bench.train_step ${DEV%% --dtype*} $TRAIN --out "$OUT/train-step-7b.json" || echo "train_step stopped: $?"
timeout 60 python3 -m bench.moe_verify $DEV $MOE --out "$OUT/moe-verify.json" | tee "$OUT/moe-verify.md" || echo "moe_verify stopped: $?"
