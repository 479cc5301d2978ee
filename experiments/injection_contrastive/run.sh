#!/usr/bin/env bash
# The injection-robust analyst study (issue 15) on the tiny analyst, 3 seeds, CPU.
# For each seed: the plain SFT analyst (an existing `+experiment=auth_grpo_tiny` sft step: full weights,
# 4-layer tiny_llama with whole-token schema keys, lora=none), then on its weights
#   C   SFT + causal-contrastive          (stage=contrastive, fresh LoRA r16 on the SFT weights)
#   D   SFT + DPO on injection pairs      (stage=dpo dataset=injection_preferences, fresh LoRA r16 on the SFT weights)
#   D+C SFT + DPO, then causal-contrastive (the DPO adapter, trained on by stage=contrastive)
#   A   SFT + adversarial SFT (StruQ: injected training windows with their correct analysis, full weights)
#   A+D SFT + adversarial SFT, then DPO on injection pairs (SecAlign's two halves)
#   and schema-constrained decoding (infer.constrained=true) as extra evaluations of SFT, A and A+D
#   control: the same extra SFT as A on the benign windows only (dataset.include_injected=false)
# and every analyst scored by stage=evaluate dataset=injection_triplets on the same 43 held-out test windows.
# EXTRA=1 (default) adds what was tried beyond those rows: a stronger DPO (60 steps, lr 5e-3) every seed, and
# causal-contrastive with the last prompt token's representation (contrastive.pooling=last) for seed 1.
#   SFT_ROOT=/tmp/exp/seeds OUT=/tmp/exp/inj bash experiments/injection_contrastive/run.sh
set -euo pipefail
SFT_ROOT=${SFT_ROOT:-/tmp/exp/seeds}   # <SFT_ROOT>/<seed-1>/sft: the SFT run of train.seed=<seed>
OUT=${OUT:-/tmp/exp/inj}
SEEDS=${SEEDS:-1 2 3}
EXTRA=${EXTRA:-1}
# ROWS=core: only plain SFT, SFT + causal-contrastive, SFT + DPO, adversarial SFT, adversarial SFT then DPO and the
# three constrained evaluations (no DPO-then-contrastive, no benign-only control, no EXTRA)
ROWS=${ROWS:-all}
# ROWS=adv: only plain SFT, adversarial SFT and adversarial SFT then DPO, each also with constrained decoding
# ADV: the adversarial SFT's training data and length (tuned on the validation windows, README "Session 10");
# ADV="" gives the earlier tables' adversarial SFT (one injected version of each training window, 150 steps)
ADV=${ADV-"dataset.train_injections_per_window=4 dataset.include_counterfactual=true train.max_steps=600"}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# the tiny analyst's model (auth_grpo_tiny) + what this study trains: LoRA r16 on the SFT weights, fp32 on the CPU
# RP: the evaluations' repetition penalty. The published table decodes with seed 000's 1.2 (the tiny preset's value
# when it was made; the preset now uses 1.0); RP=1.0 gives the re-evaluation rows in the README.
RP=${RP:-1.2}
BASE="+experiment=auth_grpo_tiny logger=none train.precision=fp32 generation.repetition_penalty=$RP"
COMMON="$BASE lora=r16_all_linear train.batch_size=4 train.grad_accum=1"
TRAIN="train.max_steps=30 train.learning_rate=0.002"
CONTRASTIVE="stage=contrastive loss=causal_contrastive dataset=injection_triplets train.eval_steps=10 train.save_steps=10"
DPO="stage=dpo loss=dpo dataset=injection_preferences"
EVALUATE="stage=evaluate dataset=injection_triplets"
# adversarial SFT (StruQ) on the SFT weights: dataset=injection_triplets in stage=sft yields benign → output and injected →
# injection_output pairs (dataset.include_injected=true); lora=none continues the full weights
ADV_SFT="stage=sft loss=causal_lm dataset=injection_triplets lora=none train.max_steps=150 train.learning_rate=0.005 generation.preview_samples=0"

run() {  # run <dir> <args...>: skip a step whose result.json says succeeded
  local dir=$1; shift
  if grep -qs '"status": "succeeded"' "$dir/result.json"; then echo "skip $dir"; return; fi
  nice -n 10 $PY -m sectune ${RUN_COMMON:-$COMMON} "$@" hydra.run.dir="$dir" > "$dir.log" 2>&1 || { echo "FAILED $dir (see $dir.log)"; return 1; }
  echo "done $dir"
}

for seed in $SEEDS; do
  sft=$SFT_ROOT/$((seed - 1))/sft
  # wait for an SFT run still training; stop on one that failed or does not exist (it waited forever: session 36)
  until grep -qs '"status": "succeeded"' "$sft/result.json"; do
    if [ ! -f "$sft/result.json" ] && [ ! -d "$(dirname "$sft")" ]; then echo "no SFT run at $sft (SFT_ROOT=$SFT_ROOT)" >&2; exit 1; fi
    if [ -f "$sft/result.json" ] && ! grep -qs '"status": "running"' "$sft/result.json"; then echo "the SFT run $sft did not succeed" >&2; exit 1; fi
    echo "waiting for $sft"; sleep 30
  done
  o=$OUT/s$seed
  mkdir -p "$o"
  run "$o/sft_eval" $EVALUATE evaluate.model_dir="$sft"
  if [ "$ROWS" != adv ]; then
    run "$o/contrastive" $CONTRASTIVE $TRAIN train.seed=$seed contrastive.init_from="$sft"
    run "$o/dpo" $DPO $TRAIN train.seed=$seed dpo.init_from="$sft"
    run "$o/dpo_eval" $EVALUATE evaluate.model_dir="$o/dpo"
  fi
  [ "$ROWS" = all ] && run "$o/dpo_contrastive" $CONTRASTIVE $TRAIN train.seed=$seed contrastive.init_from="$o/dpo"
  # StruQ's adversarial SFT: the SFT weights trained on on benign and injected training windows (each injected window
  # → its own correct analysis), full weights, 150 steps; tuned on the validation windows (README)
  RUN_COMMON="$BASE" run "$o/adv_sft" $ADV_SFT $ADV train.seed=$seed model.name_or_path="$sft/model"
  run "$o/adv_sft_eval" $EVALUATE evaluate.model_dir="$o/adv_sft"
  # adversarial SFT, then DPO on injection pairs (both halves of SecAlign)
  run "$o/adv_dpo" $DPO $TRAIN train.seed=$seed dpo.init_from="$o/adv_sft"
  run "$o/adv_dpo_eval" $EVALUATE evaluate.model_dir="$o/adv_dpo"
  # schema-constrained decoding at evaluation (infer.constrained): a system-level defence, its own rows
  run "$o/sft_eval_constrained" $EVALUATE infer.constrained=true evaluate.model_dir="$sft"
  run "$o/adv_sft_eval_constrained" $EVALUATE infer.constrained=true evaluate.model_dir="$o/adv_sft"
  run "$o/adv_dpo_eval_constrained" $EVALUATE infer.constrained=true evaluate.model_dir="$o/adv_dpo"
  # the control for adversarial SFT: the same extra SFT on the benign windows only (dataset.include_injected=false),
  # so the answer format (evidence first, then the verdict) and the extra steps are the same and only the injected
  # windows differ
  [ "$ROWS" = all ] || continue
  RUN_COMMON="$BASE" run "$o/more_sft" $ADV_SFT $ADV dataset.include_injected=false train.seed=$seed model.name_or_path="$sft/model"
  run "$o/more_sft_eval" $EVALUATE evaluate.model_dir="$o/more_sft"
  run "$o/more_sft_eval_constrained" $EVALUATE infer.constrained=true evaluate.model_dir="$o/more_sft"
  if [ "$EXTRA" = 1 ]; then
    run "$o/dpo_strong" $DPO train.max_steps=60 train.learning_rate=0.005 train.seed=$seed dpo.init_from="$sft"
    run "$o/dpo_strong_eval" $EVALUATE evaluate.model_dir="$o/dpo_strong"
    if [ "$seed" = 1 ]; then
      run "$o/contrastive_last" $CONTRASTIVE $TRAIN train.seed=$seed contrastive.pooling=last contrastive.init_from="$sft"
    fi
  fi
done
$PY experiments/injection_contrastive/table.py "$OUT" $SEEDS
