#!/usr/bin/env bash
# Full fine-tuning (every weight trains) with DeepSpeed ZeRO stage 2 (deepspeed.json; DS_CONFIG=deepspeed_zero3.json
# for ZeRO-3) and fp16 on the ADGEN sample, the demo model by default; checkpoints are whole models (evaluate with
# evaluate_finetune.sh). Needs DeepSpeed. On GPUs NUM_GPUS is the number of processes; without GPUs add --use_cpu:
# DeepSpeed's CPU accelerator then runs NUM_GPUS processes in fp32 (gloo). Works from any directory; settings are
# environment variables; extra arguments go to main.py. The original's run on the real model (4 GPUs, as in its
# results table):
#   MODEL=THUDM/chatglm-6b DATA=AdvertiseGen SOURCE_LEN=64 TARGET_LEN=64 NUM_GPUS=4 LR=1e-4 STEPS=5000 BATCH=4 ACCUM=1 bash ds_train_finetune.sh
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v deepspeed >/dev/null || ! python3 -c "import deepspeed" 2>/dev/null; then
    echo "ds_train_finetune.sh needs DeepSpeed: pip install deepspeed" >&2
    echo "Without DeepSpeed, full fine-tuning runs as plain main.py without --pre_seq_len / --lora_rank (see README.md)." >&2
    exit 1
fi

DS_CONFIG=${DS_CONFIG:-deepspeed.json}  # ZeRO-2; deepspeed_zero3.json for ZeRO-3
MODEL=${MODEL:-../demo_model}
DATA=${DATA:-data/adgen_sample}
SOURCE_LEN=${SOURCE_LEN:-96}
TARGET_LEN=${TARGET_LEN:-160}
NUM_GPUS=${NUM_GPUS:-1}
LR=${LR:-1e-4}
STEPS=${STEPS:-100}
BATCH=${BATCH:-4}
ACCUM=${ACCUM:-4}
MASTER_PORT=${MASTER_PORT:-$(shuf -n 1 -i 10000-65535)}
OUTPUT=${OUTPUT:-output/adgen-$(basename "$MODEL")-ft-$LR}

deepspeed --num_gpus="$NUM_GPUS" --master_port "$MASTER_PORT" main.py \
    --deepspeed "$DS_CONFIG" \
    --do_train \
    --train_file "$DATA/train.json" \
    --test_file "$DATA/dev.json" \
    --prompt_column content \
    --response_column summary \
    --overwrite_cache \
    --model_name_or_path "$MODEL" \
    --output_dir "$OUTPUT" \
    --max_source_length "$SOURCE_LEN" \
    --max_target_length "$TARGET_LEN" \
    --per_device_train_batch_size "$BATCH" \
    --per_device_eval_batch_size 1 \
    --gradient_accumulation_steps "$ACCUM" \
    --predict_with_generate \
    --max_steps "$STEPS" \
    --logging_steps 10 \
    --save_steps "$(( STEPS > 1000 ? 1000 : STEPS ))" \
    --learning_rate "$LR" \
    --fp16 \
    "$@"
