#!/usr/bin/env bash
# docs/analysis.md: the reproduction's models (docs/reproduction.md, 49,152 tokens on the CPU) trained
# again and kept, then analysed on the training domain's held-out files (run tools/demo.sh first, or
# python tools/fetch_smollm2.py && python tools/fetch_corpus.py python3.11-doc bible-kjv-text).
#   1. by tools/bench_cpt.py (about 7 min a run on a quiet 2-core CPU; TRAIN=0 reuses the runs in work/bench):
#      LLaMA-Pro and MIDUS (the bundled recipes), a MIDUS twin with memory.retrieval: frozen, the follow-up
#      (recipes/ablation/smollm2-135m-midus-qn-batch.yaml), both MIDUS recipes again at memory lr 1e-2, and
#      the reproduction's best variant (query_source: hidden, memory lr 1e-2); the lr-1e-2 pair again at seed 1
#   2. analyze: MIDUS (head importance, slot usage, fixed vs learned retrieval), LLaMA-Pro (its inserted
#      attention heads), the follow-up, the hidden variant; slot usage of the memory-lr-1e-2 pair; the base's
#      loss on the same blocks
#   3. why so few slots: tools/diagnose_queries.py on the untrained output and the trained MIDUS models
#   4. copy the JSON, PNGs and the diagnosis into docs/results/ (analysis-repro-*)
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
bench=work/bench
midus=$bench/cpt-tokens-49152-analysis/runs/MIDUS/final
llama_pro=$bench/cpt-tokens-49152-analysis/runs/LLaMA-Pro/final
frozen=$bench/cpt-tokens-49152-analysis-midus-frozen-retrieval/runs/MIDUS/final
batch=$bench/cpt-tokens-49152-midus-qn-batch/runs/MIDUS/final
midus_lr=$bench/cpt-tokens-49152-analysis-midus-memlr1e-2/runs/MIDUS/final
batch_lr=$bench/cpt-tokens-49152-midus-qn-batch-memlr1e-2/runs/MIDUS/final
hidden=$bench/cpt-tokens-49152-analysis-midus-qs-hidden-memlr1e-2/runs/MIDUS/final
qn_batch=recipes/ablation/smollm2-135m-midus-qn-batch.yaml

if [ "${TRAIN:-1}" != 0 ]; then
  step "1/4 train (bench_cpt.py, 49,152 tokens each)"
  python tools/bench_cpt.py --only LLaMA-Pro MIDUS --label tokens-49152-analysis
  python tools/bench_cpt.py --only MIDUS --memory-retrieval frozen --label tokens-49152-analysis-midus-frozen-retrieval
  python tools/bench_cpt.py --only MIDUS --midus-recipe $qn_batch --label tokens-49152-midus-qn-batch
  python tools/bench_cpt.py --only MIDUS --memory-lr 1e-2 --label tokens-49152-analysis-midus-memlr1e-2
  python tools/bench_cpt.py --only MIDUS --memory-lr 1e-2 --midus-recipe $qn_batch --label tokens-49152-midus-qn-batch-memlr1e-2
  python tools/bench_cpt.py --only MIDUS --memory-lr 1e-2 --midus-recipe recipes/ablation/smollm2-135m-midus-qs-hidden.yaml \
    --label tokens-49152-analysis-midus-qs-hidden-memlr1e-2
  # the follow-up's comparison at lr 1e-2 again at seed 1 (no analysis: their held-out numbers only)
  python tools/bench_cpt.py --only MIDUS --memory-lr 1e-2 --seed 1 --label tokens-49152-seed1-analysis-midus-memlr1e-2
  python tools/bench_cpt.py --only MIDUS --memory-lr 1e-2 --seed 1 --midus-recipe $qn_batch --label tokens-49152-seed1-midus-qn-batch-memlr1e-2
  # how much float rounding alone moves the hidden run: the same config, torch's for-loop AdamW instead of the fused one
  midus-surgery train $bench/cpt-tokens-49152-analysis-midus-qs-hidden-memlr1e-2/train-MIDUS.yaml \
    optim.implementation=for-loop run_dir=$PWD/$bench/hidden-forloop resume=null --quiet
  tail -1 $bench/hidden-forloop/metrics.jsonl
fi

# the held-out tenth of the Python docs, as bench_cpt.py splits them (the blocks its held-out column reads)
mapfile -t held < <(cd tools && python -c "from bench_cpt import ROOT, split_files; print(*split_files(ROOT / 'work/corpora/python3.11-doc', 10)[1], sep='\n')")
args=(--data "${held[@]}" --block-size 256 --max-blocks 8 --quiet)

step "2/4 analyze (8 held-out blocks of 256)"
midus-surgery analyze "$midus" --out work/analysis/repro-midus --overwrite --fixed-retrieval "$frozen" "${args[@]}"
midus-surgery analyze "$llama_pro" --out work/analysis/repro-llama-pro --overwrite "${args[@]}"
midus-surgery analyze "$batch" --out work/analysis/repro-midus-qn-batch --overwrite "${args[@]}"
midus-surgery analyze "$hidden" --out work/analysis/repro-midus-qs-hidden-memlr1e-2 --overwrite "${args[@]}"
midus-surgery analyze "$midus_lr" --out work/analysis/repro-midus-memlr1e-2 --overwrite --slots-only "${args[@]}"
midus-surgery analyze "$batch_lr" --out work/analysis/repro-midus-qn-batch-memlr1e-2 --overwrite --slots-only "${args[@]}"
midus-surgery eval work/smollm2-135m "${args[@]}"

step "3/4 the queries: shared direction and slot spread, untrained and trained"
for model in work/out/smollm2-135m-midus "$midus" "$batch" "$midus_lr" "$batch_lr" "$hidden"; do
  python tools/diagnose_queries.py "$model" --data "${held[@]}" --max-blocks 8
done | tee work/analysis/query-diagnosis.txt

step "4/4 copy into docs/results/"
for name in midus llama-pro midus-qn-batch midus-memlr1e-2 midus-qn-batch-memlr1e-2 midus-qs-hidden-memlr1e-2; do
  cp work/analysis/repro-$name/analysis.json docs/results/analysis-repro-$name.json
  if [ -f work/analysis/repro-$name/head_importance.png ]; then
    cp work/analysis/repro-$name/head_importance.png docs/results/analysis-repro-$name-heads.png
  fi
  if [ -f work/analysis/repro-$name/slot_usage.png ]; then
    cp work/analysis/repro-$name/slot_usage.png docs/results/analysis-repro-$name-slots.png
  fi
done
cp work/analysis/query-diagnosis.txt docs/results/analysis-repro-query-diagnosis.txt
echo "wrote docs/results/analysis-repro-*"
