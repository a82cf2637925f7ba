#!/usr/bin/env bash
# P-Tuning v2 on the ADGEN sample (ptuning/data/adgen_sample) with the demo model: about a minute on 2 CPU cores.
# Works from any directory. Every setting is an environment variable; extra arguments go to main.py.
# The original's run on the real model and the full ADGEN data (put AdvertiseGen/ into ptuning/):
#   MODEL=THUDM/chatglm-6b DATA=AdvertiseGen SOURCE_LEN=64 TARGET_LEN=64 PRE_SEQ_LEN=128 LR=2e-2 STEPS=3000 QUANT=4 BATCH=1 ACCUM=16 bash train.sh --activation_checkpointing
set -euo pipefail
cd "$(dirname "$0")"

# LAUNCH runs main.py: "torchrun --nproc_per_node 2" trains on 2 processes (DDP; see README.md, more than one machine)
LAUNCH=${LAUNCH:-python3}
MODEL=${MODEL:-../demo_model}
DATA=${DATA:-data/adgen_sample}
SOURCE_LEN=${SOURCE_LEN:-96}
TARGET_LEN=${TARGET_LEN:-160}
PRE_SEQ_LEN=${PRE_SEQ_LEN:-32}
LR=${LR:-1}
STEPS=${STEPS:-200}
BATCH=${BATCH:-8}
ACCUM=${ACCUM:-1}
QUANT=${QUANT:-}
OUTPUT=${OUTPUT:-output/adgen-$(basename "$MODEL")-pt-$PRE_SEQ_LEN-$LR}

$LAUNCH main.py \
    --do_train \
    --train_file "$DATA/train.json" \
    --validation_file "$DATA/dev.json" \
    --prompt_column content \
    --response_column summary \
    --overwrite_cache \
    --model_name_or_path "$MODEL" \
    --output_dir "$OUTPUT" \
    --max_source_length "$SOURCE_LEN" \
    --max_target_length "$TARGET_LEN" \
    --per_device_train_batch_size "$BATCH" \
    --per_device_eval_batch_size "$BATCH" \
    --gradient_accumulation_steps "$ACCUM" \
    --predict_with_generate \
    --max_steps "$STEPS" \
    --logging_steps 10 \
    --save_steps "$(( STEPS > 1000 ? 1000 : STEPS ))" \
    --learning_rate "$LR" \
    --pre_seq_len "$PRE_SEQ_LEN" \
    ${QUANT:+--quantization_bit "$QUANT"} \
    "$@"
