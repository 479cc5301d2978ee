#!/bin/bash
# Session 25 (README "Texts grouped by similarity"): issue 15's best row re-measured after injection texts were grouped by
# similarity. Session 20's SFT analysts (SFT_ROOT/0|1|2/sft: round nineteen's, experiments/auth_grpo), adversarial SFT
# retrained on the new training texts (run.sh's settings), each scored with constrained decoding on the validation
# windows, on 1 and on 4 injections per test window; plain SFT on 4. ~25 min on 2 cores.
#   SFT_ROOT=/tmp/exp/cproot OUT=/tmp/exp25g bash experiments/injection_contrastive/similar_texts_rerun.sh
cd "$(dirname "$0")/../.."
export SECTUNE_SHARED_DATA=${SECTUNE_SHARED_DATA:-../shared/data} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PY:-.venv/bin/python}
: "${SFT_ROOT:?set SFT_ROOT}" "${OUT:?set OUT}"
BASE="+experiment=auth_grpo_tiny logger=none train.precision=fp32 generation.repetition_penalty=1.0"
run() { dir=$1; shift; grep -qs '"status": "succeeded"' $dir/result.json && return; nice -n 5 $PY -m sectune $BASE "$@" hydra.run.dir=$dir > $dir.log 2>&1; echo "$dir rc=$?" >> $OUT/done.txt; }
job() {
  s=$1; o=$OUT/s$s; sft=$SFT_ROOT/$((s-1))/sft; mkdir -p $o
  run $o/adv_sft stage=sft loss=causal_lm dataset=injection_triplets lora=none train.learning_rate=0.005 generation.preview_samples=0 \
      dataset.train_injections_per_window=4 dataset.include_counterfactual=true train.max_steps=600 train.seed=$s model.name_or_path=$sft/model
  run $o/adv_val stage=evaluate dataset=injection_triplets infer.constrained=true evaluate.split=validation evaluate.model_dir=$o/adv_sft
  run $o/adv_k1 stage=evaluate dataset=injection_triplets infer.constrained=true evaluate.model_dir=$o/adv_sft
  run $o/adv_k4 stage=evaluate dataset=injection_triplets infer.constrained=true dataset.injections_per_window=4 evaluate.model_dir=$o/adv_sft
  run $o/sft_k4 stage=evaluate dataset=injection_triplets infer.constrained=true dataset.injections_per_window=4 evaluate.model_dir=$sft
}
mkdir -p $OUT
job 1 & job 2 & wait; job 3; echo ALL >> $OUT/done.txt
