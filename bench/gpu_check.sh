#!/usr/bin/env bash
# sectune's checks on a lent GPU, as one call (bench/gpu_wheels.sh first, here; then, through the device tool, with
# .whl carried: `python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
# PYTHONPATH=/tmp/site:$PWD bash bench/gpu_check.sh`). Most important first; each part's log goes to $OUT (or
# /tmp/sectune_gpu), its summary to the console. ~6 min on one H100 without part 4 (session 28: parts 1-3 took 3.5 min).
#   1. seed 000's pipeline step by step: each step's memory check against its measured peak (bench/gpu_stages.py)
#   2. GRPO vs TRL's GRPOTrainer at SmolLM-135M's shape, and the beta=0 / shared_prompt=false variants
#   3. the CUDA-sensitive tests (precision, quantized adapters, peaks; stage=export merging and reading back on CUDA)
#   4. part 1 again under PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (the caching allocator's slack)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
O=${OUT:-/tmp/sectune_gpu}; mkdir -p "$O"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch,transformers,trl,peft,bitsandbytes;print('versions', torch.__version__, transformers.__version__, trl.__version__, peft.__version__, bitsandbytes.__version__)"
echo "== 1 gpu_stages $(date +%T)"
python3 bench/gpu_stages.py --steps 2 --work /tmp/gs --timeout 300 > "$O/gpu_stages.log" 2>&1; echo "exit $?"
grep -E "^sectune: memory check" "$O/gpu_stages.log" | cut -c1-330; tail -6 "$O/gpu_stages.log" | cut -c1-2500
echo "== 2 grpo $(date +%T)"
timeout 240 python3 bench/grpo_throughput.py --device cuda --model smollm --prompts 1 --max-completion-length 128 --steps 3 \
  --repeats 1 --variants "${GRPO_VARIANTS-beta0,noshare}" > "$O/grpo.log" 2>&1; echo "exit $?"
tail -9 "$O/grpo.log" | cut -c1-2500
echo "== 3 pytest $(date +%T)"
timeout 300 python3 -m pytest -q -p no:cacheprovider --timeout 150 \
  tests/test_contrastive.py::test_training_forward_runs_under_the_requested_mixed_precision \
  tests/test_sft.py::test_quantized_lora_adapter_stays_fp32_through_the_trl_trainer \
  tests/test_rl.py::test_quantized_policy_adapter_stays_fp32_through_the_trl_trainer \
  tests/test_rl.py::test_a_lora_reward_model_scores_on_the_policys_own_base_and_leaves_the_policy_as_it_was \
  tests/test_dpo.py::test_quantized_policy_keeps_the_loaded_adapter_fp32_bit_for_bit \
  tests/test_reward.py::test_final_eval_loss_is_computed_in_the_training_precision \
  tests/test_pipeline.py::test_each_pipeline_step_reports_its_own_peak_gpu_memory \
  tests/test_export.py tests/test_dora.py tests/test_chat_template.py > "$O/pytest.log" 2>&1; echo "exit $?"
tail -8 "$O/pytest.log" | cut -c1-600
if [ -n "${ALLOC_CHECK-1}" ]; then
  echo "== 4 gpu_stages, expandable segments $(date +%T)"
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python3 bench/gpu_stages.py --steps 2 --work /tmp/gs --timeout 200 \
    > "$O/gpu_stages_es.log" 2>&1; echo "exit $?"
  tail -6 "$O/gpu_stages_es.log" | cut -c1-2500
fi
echo "== end $(date +%T)"
