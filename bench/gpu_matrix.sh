#!/usr/bin/env bash
# The GPU benchmark matrix, for a machine with a CUDA GPU (e.g. the lent H100).
# SPEED=1 also runs the speed benchmark (give it a call of its own).
# Resumable: each call continues where the last stopped, and stops starting new runs
# after TIME_BUDGET minutes, so it fits short device calls. Run it again until the second
# quality.py (the adapter-first systems) says "Matrix complete", then `python bench/table.py`
# updates the README.
#   MODEL_GGUF=bench/work/models/qwen2.5-coder-1.5b-instruct.gguf DATA=../shared/data/crossner bash bench/gpu_matrix.sh
# Get the GGUF with `python bench/get_model.py qwen2.5-coder-1.5b-instruct DIR` (and see
# ../shared/gpu/README.md for carrying wheels, model and data to a machine without internet).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MODEL_GGUF:?set MODEL_GGUF to the .gguf file}"
: "${DATA:?set DATA to the CrossNER folder}"
TIME_BUDGET=${TIME_BUDGET:-8}
STAGE=${STAGE:-bench/work}  # where the dequantized copy is kept (gitignored)
name=$(basename "$MODEL_GGUF" .gguf)
folder="$STAGE/$name-bf16"
# dequantizing a GGUF takes about a minute: do it once and keep a safetensors copy
if [ ! -f "$folder/config.json" ]; then
  python -m spacy_cllmfs export-model "$MODEL_GGUF" "$folder" --dtype bfloat16 --device cuda:0
fi
# most important first: politics K=5 cllmfs, its baselines and the tuned in-context path
# (spacy_llm_lora), the other domains, then K=20 and extra seeds; the systems that first
# train an adapter on thousands of sentences (more than one short lease on an H200) come
# after the K-shot systems of every domain
began=$(date +%s)
for systems in cllmfs,spacy_ner,spacy_llm,spacy_llm_lora,cllmfs_lora,cllmfs_sentence_first spacy_llm_general,cllmfs_general,cllmfs_transfer; do
  left=$(python -c "print(max(0.0, $TIME_BUDGET - ($(date +%s) - $began) / 60))")
  [ "$left" = 0.0 ] && { echo "Time budget of $TIME_BUDGET min used; rerun to continue."; break; }
  python bench/quality.py --data "$DATA" --profile gpu --model "$folder" --device cuda:0 \
    --systems "$systems" --time-budget "$left" --output "bench/results/quality-gpu-$name.json"
done
if [ "${SPEED:-0}" = 1 ]; then  # a separate call: one generate() per prompt is slow (~1 prompt/s)
  python bench/speed.py --data "$DATA" --domain politics --limit 50 --model "$folder" --device cuda:0 \
    --batch-size 256 --max-new-tokens 96 --output "bench/results/speed-gpu-$name-politics.json"
fi
