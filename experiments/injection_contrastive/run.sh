#!/usr/bin/env bash
# The injection-robust analyst study (issue 15) on the tiny analyst, 3 seeds, CPU.
# For each seed: the plain SFT analyst (an existing `+experiment=auth_grpo_tiny` sft step: full weights,
# 4-layer tiny_llama with whole-token schema keys, lora=none), then on its weights
#   C   SFT + causal-contrastive          (stage=contrastive, fresh LoRA r16 on the SFT weights)
#   D   SFT + DPO on injection pairs      (stage=dpo dataset=injection_preferences, fresh LoRA r16 on the SFT weights)
#   D+C SFT + DPO, then causal-contrastive (the DPO adapter, trained on by stage=contrastive)
# and every analyst scored by stage=evaluate dataset=injection_triplets on the same 43 held-out test windows.
# EXTRA=1 (default) adds what was tried beyond those rows: a stronger DPO (60 steps, lr 5e-3) every seed, and
# causal-contrastive with the last prompt token's representation (contrastive.pooling=last) for seed 1.
#   SFT_ROOT=/tmp/exp/seeds OUT=/tmp/exp/inj bash experiments/injection_contrastive/run.sh
set -euo pipefail
SFT_ROOT=${SFT_ROOT:-/tmp/exp/seeds}   # <SFT_ROOT>/<seed-1>/sft: the SFT run of train.seed=<seed>
OUT=${OUT:-/tmp/exp/inj}
SEEDS=${SEEDS:-1 2 3}
EXTRA=${EXTRA:-1}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# the tiny analyst's model (auth_grpo_tiny) + what this study trains: LoRA r16 on the SFT weights, fp32 on the CPU
COMMON="+experiment=auth_grpo_tiny lora=r16_all_linear logger=none train.precision=fp32 train.batch_size=4 train.grad_accum=1"
TRAIN="train.max_steps=30 train.learning_rate=0.002"
CONTRASTIVE="stage=contrastive loss=causal_contrastive dataset=injection_triplets train.eval_steps=10 train.save_steps=10"
DPO="stage=dpo loss=dpo dataset=injection_preferences"
EVALUATE="stage=evaluate dataset=injection_triplets"

run() {  # run <dir> <args...>: skip a step whose result.json says succeeded
  local dir=$1; shift
  if grep -qs '"status": "succeeded"' "$dir/result.json"; then echo "skip $dir"; return; fi
  nice -n 10 $PY -m sectune $COMMON "$@" hydra.run.dir="$dir" > "$dir.log" 2>&1 || { echo "FAILED $dir (see $dir.log)"; return 1; }
  echo "done $dir"
}

for seed in $SEEDS; do
  sft=$SFT_ROOT/$((seed - 1))/sft
  until grep -qs '"status": "succeeded"' "$sft/result.json"; do echo "waiting for $sft"; sleep 30; done
  o=$OUT/s$seed
  mkdir -p "$o"
  run "$o/sft_eval" $EVALUATE evaluate.model_dir="$sft"
  run "$o/contrastive" $CONTRASTIVE $TRAIN train.seed=$seed contrastive.init_from="$sft"
  run "$o/dpo" $DPO $TRAIN train.seed=$seed dpo.init_from="$sft"
  run "$o/dpo_eval" $EVALUATE evaluate.model_dir="$o/dpo"
  run "$o/dpo_contrastive" $CONTRASTIVE $TRAIN train.seed=$seed contrastive.init_from="$o/dpo"
  if [ "$EXTRA" = 1 ]; then
    run "$o/dpo_strong" $DPO train.max_steps=60 train.learning_rate=0.005 train.seed=$seed dpo.init_from="$sft"
    run "$o/dpo_strong_eval" $EVALUATE evaluate.model_dir="$o/dpo_strong"
    if [ "$seed" = 1 ]; then
      run "$o/contrastive_last" $CONTRASTIVE $TRAIN train.seed=$seed contrastive.pooling=last contrastive.init_from="$sft"
    fi
  fi
done
$PY experiments/injection_contrastive/table.py "$OUT" $SEEDS
