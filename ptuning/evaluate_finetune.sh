#!/usr/bin/env bash
# Generates and scores the ADGEN sample's dev set with a full fine-tune checkpoint (a whole model directory,
# from ds_train_finetune.sh or main.py without --pre_seq_len / --lora_rank).
# Use the same variables as for ds_train_finetune.sh. Real model: MODEL=THUDM/chatglm-6b DATA=AdvertiseGen SOURCE_LEN=64 TARGET_LEN=64
# LR=1e-4 STEPS=5000 bash evaluate_finetune.sh (names output/adgen-chatglm-6b-ft-1e-4/checkpoint-5000).
set -euo pipefail
cd "$(dirname "$0")"

MODEL=${MODEL:-../demo_model}
DATA=${DATA:-data/adgen_sample}
SOURCE_LEN=${SOURCE_LEN:-96}
TARGET_LEN=${TARGET_LEN:-160}
LR=${LR:-1e-4}
STEPS=${STEPS:-100}
BATCH=${BATCH:-16}
CHECKPOINT=${CHECKPOINT:-output/adgen-$(basename "$MODEL")-ft-$LR/checkpoint-$STEPS}
OUTPUT=${OUTPUT:-$(dirname "$CHECKPOINT")}

python3 main.py \
    --do_predict \
    --test_file "$DATA/dev.json" \
    --overwrite_cache \
    --prompt_column content \
    --response_column summary \
    --model_name_or_path "$CHECKPOINT" \
    --output_dir "$OUTPUT" \
    --max_source_length "$SOURCE_LEN" \
    --max_target_length "$TARGET_LEN" \
    --per_device_eval_batch_size "$BATCH" \
    --predict_with_generate \
    "$@"
