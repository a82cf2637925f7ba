#!/usr/bin/env bash
# The repository's web demo (web_demo.py) with the P-Tuning checkpoint of train.sh.
# Use the same variables as for train.sh; CHECKPOINT picks another checkpoint. Extra arguments go to web_demo.py.
# Real model: MODEL=THUDM/chatglm-6b PRE_SEQ_LEN=128 LR=2e-2 STEPS=3000 QUANT=4 bash web_demo.sh
set -euo pipefail
cd "$(dirname "$0")"

MODEL=${MODEL:-../demo_model}
PRE_SEQ_LEN=${PRE_SEQ_LEN:-32}
LR=${LR:-1}
STEPS=${STEPS:-200}
QUANT=${QUANT:-}
CHECKPOINT=${CHECKPOINT:-output/adgen-$(basename "$MODEL")-pt-$PRE_SEQ_LEN-$LR/checkpoint-$STEPS}

python3 ../web_demo.py \
    --model-path "$MODEL" \
    --ptuning-checkpoint "$CHECKPOINT" \
    --pre-seq-len "$PRE_SEQ_LEN" \
    ${QUANT:+--quantize "$QUANT"} \
    "$@"
