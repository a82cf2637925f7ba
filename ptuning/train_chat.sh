#!/usr/bin/env bash
# P-Tuning v2 on multi-turn dialogues (ptuning/data/chat_sample: prompt, response and a history of earlier
# [query, answer] turns, turned into chat()'s [Round i] prompt) with the demo model, then scores the dev set.
# Works from any directory; every setting is an environment variable; extra arguments go to main.py.
# The original's settings for the real model:
#   MODEL=THUDM/chatglm-6b DATA=your_chat_data PRE_SEQ_LEN=128 LR=1e-2 STEPS=3000 QUANT=4 BATCH=1 ACCUM=16 bash train_chat.sh --activation_checkpointing
set -euo pipefail
cd "$(dirname "$0")"

# LAUNCH runs main.py: "torchrun --nproc_per_node 2" trains on 2 processes (DDP; see README.md, more than one machine)
LAUNCH=${LAUNCH:-python3}
MODEL=${MODEL:-../demo_model}
DATA=${DATA:-data/chat_sample}
PRE_SEQ_LEN=${PRE_SEQ_LEN:-32}
LR=${LR:-1}
STEPS=${STEPS:-200}
BATCH=${BATCH:-8}
ACCUM=${ACCUM:-1}
QUANT=${QUANT:-}
OUTPUT=${OUTPUT:-output/chat-$(basename "$MODEL")-pt-$PRE_SEQ_LEN-$LR}

$LAUNCH main.py \
    --do_train \
    --do_predict \
    --train_file "$DATA/train.json" \
    --test_file "$DATA/dev.json" \
    --prompt_column prompt \
    --response_column response \
    --history_column history \
    --overwrite_cache \
    --model_name_or_path "$MODEL" \
    --output_dir "$OUTPUT" \
    --max_source_length 256 \
    --max_target_length 256 \
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
