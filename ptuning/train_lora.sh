#!/usr/bin/env bash
# LoRA (peft) on the ADGEN sample with the demo model: rank-R adapters on query_key_value train, the model
# stays frozen, and checkpoints hold the adapters only. Evaluate with
#   CHECKPOINT=output/adgen-demo_model-lora-8-1e-2/checkpoint-200 bash evaluate.sh
# Works from any directory; every setting is an environment variable; extra arguments go to main.py.
# Settings of the LoRA row of the original's results table, on the real model:
#   MODEL=THUDM/chatglm-6b DATA=AdvertiseGen SOURCE_LEN=64 TARGET_LEN=64 LR=5e-4 STEPS=3000 BATCH=16 bash train_lora.sh
set -euo pipefail
cd "$(dirname "$0")"

# LAUNCH runs main.py: "torchrun --nproc_per_node 2" trains on 2 processes (DDP; see README.md, more than one machine)
LAUNCH=${LAUNCH:-python3}
MODEL=${MODEL:-../demo_model}
DATA=${DATA:-data/adgen_sample}
SOURCE_LEN=${SOURCE_LEN:-96}
TARGET_LEN=${TARGET_LEN:-160}
LORA_RANK=${LORA_RANK:-8}
LR=${LR:-1e-2}
STEPS=${STEPS:-200}
BATCH=${BATCH:-8}
ACCUM=${ACCUM:-1}
OUTPUT=${OUTPUT:-output/adgen-$(basename "$MODEL")-lora-$LORA_RANK-$LR}

$LAUNCH main.py \
    --do_train \
    --train_file "$DATA/train.json" \
    --prompt_column content \
    --response_column summary \
    --overwrite_cache \
    --model_name_or_path "$MODEL" \
    --output_dir "$OUTPUT" \
    --max_source_length "$SOURCE_LEN" \
    --max_target_length "$TARGET_LEN" \
    --per_device_train_batch_size "$BATCH" \
    --gradient_accumulation_steps "$ACCUM" \
    --max_steps "$STEPS" \
    --logging_steps 10 \
    --save_steps "$(( STEPS > 1000 ? 1000 : STEPS ))" \
    --learning_rate "$LR" \
    --lora_rank "$LORA_RANK" \
    --lora_alpha 32 \
    --lora_dropout 0.1 \
    --lora_target query_key_value \
    "$@"
