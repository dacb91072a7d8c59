#!/usr/bin/env bash
# The GPU figures in decoder_transformer/README.md, in one go (an estimated 3-5 minutes on one H100/H200):
#   1. --preset gpu (nanoGPT's 6x6x384 model, context 256, 5000 steps, bf16 autocast), RoPE
#   2. 500-token generation with and without the KV cache on that checkpoint
#   3. the temperature x top-p sweep, and samples at three settings
# Run from the repository root with Tiny Shakespeare at data/tinyshakespeare/input.txt:
#   OUT=results/gpu_seed0 SEED=0 [NANOGPT=<nanoGPT checkout>] bash decoder_transformer/gpu_run.sh
# Needs torch, numpy, tqdm and matplotlib (not clearml: every call has --clearml off).
# With NANOGPT set, nanoGPT's own train.py runs its shakespeare_char config first on the same GPU (wall time
# in nanogpt.log). Extra train.py flags go in TRAIN_FLAGS (e.g. "--compile", or tiny sizes for a dry run on CPU), extra
# evaluate_sampling.py flags in SWEEP_FLAGS.
set -euo pipefail
: "${OUT:?set OUT to the folder that collects the results}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"  # absolute: nanoGPT runs from its own folder
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"  # `common` without a pip install
export TQDM_MININTERVAL=5  # progress lines every 5 s, not every step, in the logs
D=decoder_transformer
RUN="$OUT/train_gpu_rope"

nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/device.txt" 2>&1 || echo "no nvidia-smi" > "$OUT/device.txt"
if [ -n "${NANOGPT:-}" ]; then
    cp data/tinyshakespeare/input.txt "$NANOGPT/data/shakespeare_char/input.txt"
    (cd "$NANOGPT" && python data/shakespeare_char/prepare.py \
        && /usr/bin/time -p python train.py config/train_shakespeare_char.py --out_dir="$OUT/nanogpt") \
        > "$OUT/nanogpt.log" 2>&1
fi
/usr/bin/time -p python $D/train.py --preset gpu --pos rope --seed "${SEED:-0}" --clearml off --out "$RUN" ${TRAIN_FLAGS:-} \
    > "$OUT/train.log" 2>&1
python $D/benchmark.py --task generate --ckpt "$RUN/checkpoint.pt" --new-tokens 500 --rounds 3 --clearml off \
    --out "$OUT/bench_generate" > "$OUT/bench_generate.log" 2>&1
python $D/evaluate_sampling.py --ckpt "$RUN/checkpoint.pt" --num-samples 8 ${SWEEP_FLAGS:-} --clearml off --out "$OUT/sampling_eval" \
    > "$OUT/sampling_eval.log" 2>&1
for setting in "0.8 0.95" "1.0 1.0" "0.5 0.5"; do
    set -- $setting
    python $D/sample.py --ckpt "$RUN/checkpoint.pt" --prompt "ROMEO:" --temperature "$1" --top-p "$2" \
        --max-new-tokens 300 --clearml off --out "$OUT/sample_T$1_p$2" > "$OUT/sample_T$1_p$2.txt" 2>&1
done
rm -f "$RUN/checkpoint.pt" "$RUN/best.pt"  # 120 MB each; the summaries, metrics and logs are what come back
tail -n 3 "$OUT/train.log"; tail -n 7 "$OUT/bench_generate.log"; tail -n 25 "$OUT/sampling_eval.log"
