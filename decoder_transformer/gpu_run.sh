#!/usr/bin/env bash
# The GPU figures in decoder_transformer/README.md in one go (about 8 minutes on one H100, with a nanoGPT checkout):
#   1. --preset gpu (nanoGPT's 6x6x384 model, context 256, 5000 steps, bf16 autocast, --compile), RoPE, the
#      first seed alone on the GPU: its wall time is the one compared with nanoGPT's
#   2. nanoGPT's own train.py, config/train_shakespeare_char.py, alone on the GPU (when NANOGPT is set)
#   3. the other seeds together (they share the GPU: their losses count, their wall times do not)
#   4. nanoGPT's best checkpoint scored on our whole validation split, and 500-token generation with and
#      without the KV cache and with nanoGPT's sampler, on the first seed's checkpoint
# Both trainers estimate the periodic val loss on 200 batches (nanoGPT's eval_iters), so they do the same
# evaluation work. Run from the repository root:
#   OUT=<results folder> DATA=<folder holding tinyshakespeare/input.txt> [NANOGPT=<nanoGPT checkout>] \
#       [SEEDS="0 1 2"] bash decoder_transformer/gpu_run.sh
#   python decoder_transformer/compare_runs.py --runs <results folder>/ours_s* \
#       --nanogpt-log <results folder>/nanogpt.log --clearml off
# Needs torch, numpy, tqdm and matplotlib (not clearml: every call has --clearml off). Extra train.py flags go
# in TRAIN_FLAGS (e.g. tiny sizes for a dry run on CPU). Checkpoints are deleted at the end (120 MB each).
set -uo pipefail
: "${OUT:?set OUT to the folder that collects the results}" "${DATA:?set DATA to the dataset folder}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)" DATA="$(cd "$DATA" && pwd)"  # absolute: nanoGPT runs from its own folder
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1  # `common` without a pip install
export TQDM_MININTERVAL=10  # progress lines every 10 s, not every step, in the logs
D=decoder_transformer
read -r -a SEED_LIST <<<"${SEEDS:-0 1 2}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/device.txt" 2>&1 ||
    echo "no nvidia-smi" >"$OUT/device.txt"
ms() { echo $(($(date +%s%N) / 1000000)); }
ours() {  # one seed of train.py; its wall time goes to walls.txt
    local start=$(ms)
    python $D/train.py --data-dir "$DATA" --preset gpu --compile --eval-batches 200 --pos rope --seed "$1" \
        --clearml off --out "$OUT/ours_s$1" ${TRAIN_FLAGS:-} >"$OUT/ours_s$1.log" 2>&1
    echo "ours seed $1 rc=$? wall_ms=$(($(ms) - start))${2:-}" | tee -a "$OUT/walls.txt"
}

ours "${SEED_LIST[0]}" " (alone on the GPU)"
if [ -n "${NANOGPT:-}" ]; then
    cp "$DATA/tinyshakespeare/input.txt" "$NANOGPT/data/shakespeare_char/input.txt"
    (cd "$NANOGPT" && python data/shakespeare_char/prepare.py) >"$OUT/nanogpt_prepare.log" 2>&1
    start=$(ms)
    (cd "$NANOGPT" && python train.py config/train_shakespeare_char.py --out_dir="$OUT/nanogpt") >"$OUT/nanogpt.log" 2>&1
    echo "nanogpt rc=$? wall_ms=$(($(ms) - start)) (alone on the GPU; prepare.py not counted)" | tee -a "$OUT/walls.txt"
fi
for seed in "${SEED_LIST[@]:1}"; do ours "$seed" " (with the other seeds on the GPU)" & done
wait

if [ -f "$OUT/nanogpt/ckpt.pt" ]; then
    python $D/benchmark.py --task nanogpt-val --nanogpt-dir "$NANOGPT" --nanogpt-ckpt "$OUT/nanogpt/ckpt.pt" \
        --data-dir "$DATA" --clearml off --out "$OUT/nanogpt_val" >"$OUT/nanogpt_val.log" 2>&1
fi
CKPT="$OUT/ours_s${SEED_LIST[0]}/checkpoint.pt"
python $D/benchmark.py --task generate --ckpt "$CKPT" ${NANOGPT:+--nanogpt-dir "$NANOGPT"} --new-tokens 500 \
    --rounds 3 --clearml off --out "$OUT/bench_generate" >"$OUT/bench_generate.log" 2>&1
find "$OUT" -name "*.pt" -delete
cat "$OUT/walls.txt"
tail -n 2 "$OUT"/ours_s*.log
tail -n 12 "$OUT/bench_generate.log"
