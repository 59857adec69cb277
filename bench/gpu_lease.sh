#!/usr/bin/env bash
# The last call of a GPU lease (see ../shared/gpu/README.md): after every chunk staged by
#   ../shared/gpu/stage .gpu .gpu-src/wheels .gpu-src/crossner.tar.gz .gpu-src/MODEL.gguf
# has arrived in /root/stage/files (recv.sh installs the wheels into /root/stage/site),
# unpack the data to ../shared/data (the path the results record), run bench/gpu_matrix.sh
# until DEADLINE seconds have passed, then copy the results and the log to $OUT. The package
# is used from this checkout (PYTHONPATH), not installed. Copy the results file back into
# bench/results before the next lease, so that the matrix resumes.
#   DEADLINE=420 TIME_BUDGET=3 MODEL=qwen2.5-coder-1.5b-instruct bash bench/gpu_lease.sh
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?run on the device machine, where OUT is set}"
MODEL=${MODEL:-qwen2.5-coder-1.5b-instruct}
FILES=${FILES:-/root/stage/files}
export PYTHONPATH=/root/stage/site:$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
began=$(date +%s)
mkdir -p ../shared/data bench/work/models bench/results
[ -d ../shared/data/crossner ] || tar xzf "$FILES/crossner.tar.gz" -C ../shared/data
ln -sf "$FILES/$MODEL.gguf" "bench/work/models/$MODEL.gguf"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
left=$(( ${DEADLINE:-420} - ($(date +%s) - began) ))
MODEL_GGUF="bench/work/models/$MODEL.gguf" DATA=../shared/data/crossner TIME_BUDGET=${TIME_BUDGET:-3} \
  timeout -k 10 "$left" bash bench/gpu_matrix.sh 2>&1 | tee "$OUT/matrix.log"
echo "gpu_lease: rc ${PIPESTATUS[0]} after $(( $(date +%s) - began )) s" | tee -a "$OUT/matrix.log"
cp bench/results/quality-gpu-*.json "$OUT/" 2>/dev/null || echo "gpu_lease: no results file yet"
cp bench/work/"$MODEL"-bf16/config.json "$OUT/model-config.json" 2>/dev/null || true
