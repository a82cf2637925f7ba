#!/usr/bin/env bash
# Generates answers for the ADGEN sample's dev set with the P-Tuning checkpoint of train.sh and scores them
# (ROUGE-1/2/L, BLEU-4) into generated_predictions.txt and predict_results.json beside the checkpoint.
# Use the same variables as for train.sh. CHECKPOINT picks another checkpoint (P-Tuning or LoRA);
# CHECKPOINT= (empty) scores the base model alone.
# Real model: MODEL=THUDM/chatglm-6b DATA=AdvertiseGen SOURCE_LEN=64 TARGET_LEN=64 PRE_SEQ_LEN=128 LR=2e-2 STEPS=3000 QUANT=4 bash evaluate.sh
set -euo pipefail
cd "$(dirname "$0")"

MODEL=${MODEL:-../demo_model}
DATA=${DATA:-data/adgen_sample}
SOURCE_LEN=${SOURCE_LEN:-96}
TARGET_LEN=${TARGET_LEN:-160}
PRE_SEQ_LEN=${PRE_SEQ_LEN:-32}
LR=${LR:-1}
STEPS=${STEPS:-200}
BATCH=${BATCH:-16}
QUANT=${QUANT:-}
CHECKPOINT=${CHECKPOINT-output/adgen-$(basename "$MODEL")-pt-$PRE_SEQ_LEN-$LR/checkpoint-$STEPS}
if [ -n "$CHECKPOINT" ]; then DEFAULT_OUTPUT=$(dirname "$CHECKPOINT"); else DEFAULT_OUTPUT=output/adgen-$(basename "$MODEL")-base; fi
OUTPUT=${OUTPUT:-$DEFAULT_OUTPUT}

python3 main.py \
    --do_predict \
    --test_file "$DATA/dev.json" \
    --overwrite_cache \
    --prompt_column content \
    --response_column summary \
    --model_name_or_path "$MODEL" \
    ${CHECKPOINT:+--ptuning_checkpoint "$CHECKPOINT"} \
    --output_dir "$OUTPUT" \
    --max_source_length "$SOURCE_LEN" \
    --max_target_length "$TARGET_LEN" \
    --per_device_eval_batch_size "$BATCH" \
    --predict_with_generate \
    ${QUANT:+--quantization_bit "$QUANT"} \
    "$@"
