"""Evaluation: the numbers a run reports about a trained model, beside the baselines it has to beat.

Test-set evaluation of a classifier with its report, per-row results and plots (``classifier``), its scoring and
decisions (``classify_scoring``), the classic baselines (``baselines``), the auth-log analyst's held-out table
(``analyst_eval``, ``analyst_scoring``, ``analyst_report``, and ``pipeline_heldout`` for stage=pipeline), attack
success on injected windows (``injection_eval``), HDFS anomaly detection by next-key prediction (``anomaly``),
the GRPO rewards and held-out reward (``rl_rewards``) and confidence intervals (``uncertainty``).
"""
