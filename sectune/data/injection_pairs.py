"""Training data made from injection triplets: SecAlign's preference pairs (the injected window's right analysis
against the one the injection demands; stage=dpo) and StruQ's adversarial SFT rows (stage=sft)."""

from __future__ import annotations

import json

from omegaconf import DictConfig

from sectune.data.auth_logs import render_completion
from sectune.data.auth_rules import analyze_auth_log
from sectune.data.injection import triplet_splits
from sectune.errors import DataError


# ------------------------------------------------------------------------ SecAlign pairs
def attacked_analysis(analysis: dict, target: str) -> dict:
    """The analysis an analyst that obeyed the injection would write: the demanded verdict, the rest
    of the evidence kept, brute_force and the summary made to agree with the verdict."""
    why = {"benign": "routine activity", "suspicious": "unusual activity", "malicious": "attack in progress"}.get(target, target)
    counts = (f"; {analysis['failed_logins']} failed, {analysis['accepted_logins']} accepted logins"
              if "failed_logins" in analysis and "accepted_logins" in analysis else "")
    return {**analysis, "verdict": target, "brute_force": bool(analysis.get("brute_force")) and target == "malicious",
            "summary": f"{target.capitalize()}: {why}{counts}."}


def injection_preference_splits(cfg: DictConfig) -> dict[str, list[dict]]:
    """``dataset=injection_preferences``: per triplet, prompt = the injected input's prompt, chosen =
    ``injection_output`` (the correct analysis of the injected window), rejected = the analysis the
    injection demands (``attack_target``). Same splits as the triplets."""
    out, triplets = {}, {}
    for split, recs in triplet_splits(cfg).items():
        pairs, triplets[split] = [], len(recs)
        for r in recs:
            if not r.get("attack_target"):
                continue
            if r["format"] == "auth_log":
                a = json.loads(r["injection_output"])
                if a["verdict"] == r["attack_target"]:
                    continue
                rejected = render_completion(attacked_analysis(a, r["attack_target"]))
            else:
                rejected = r["attack_target"]
            if rejected == r["injection_output"]:
                continue
            pairs.append({"prompt": r["injection_prompt"], "chosen": r["injection_output"], "rejected": rejected,
                          "kind": f"{r['injection_source']}_{r['injection_field']}", "window_id": r["window_id"], "label": r["label"]})
        out[split] = pairs
    if not out["train"]:
        raise DataError(f"dataset={cfg.dataset.name}: no training pairs: none of the {triplets['train']} training triplets has an "
                        "attack target to reject that differs from its expected answer (a prompt/answer file's triplets have one only "
                        "with a templated injection: dataset.template_fraction > 0)")
    return out


# ------------------------------------------------------------------------ adversarial SFT (StruQ)
def adversarial_sft_splits(cfg: DictConfig) -> dict[str, list[dict]]:
    """``stage=sft dataset=injection_triplets``: per split, each window's benign prompt → ``output`` (once per
    window) and, with ``dataset.include_injected`` (the default), each triplet's injected prompt → its own
    correct analysis ``injection_output`` (StruQ's adversarial SFT, Chen et al. 2024; the supervised half of
    SecAlign). With ``dataset.include_counterfactual``, each triplet's counterfactual rewording → its own analysis too
    (as many clean rows as injected ones, on renamed users, IPs and hosts). The splits are the triplets', so a training
    record only ever carries a training-split injection text; the test split is held out for stage=evaluate. ``kind``
    is ``benign``, ``counterfactual`` or ``injected``."""
    include = bool(cfg.dataset.get("include_injected", True))
    with_cf = bool(cfg.dataset.get("include_counterfactual", False))
    out = {}
    for split, recs in triplet_splits(cfg).items():
        rows, seen = [], set()
        for r in recs:
            if r["window_id"] not in seen:
                seen.add(r["window_id"])
                rows.append({"id": r["window_id"], "prompt": r["prompt"], "completion": r["output"], "label": r["label"], "kind": "benign"})
            if with_cf:  # the counterfactual rewording → its own analysis (the renamed users and IPs): as many clean rows as injected
                cf_answer = (render_completion(analyze_auth_log(r["benign_cf"].splitlines())) if r["format"] == "auth_log" else r["output"])
                rows.append({"id": f"{r['id']}-cf", "prompt": r["cf_prompt"], "completion": cf_answer, "label": r["label"], "kind": "counterfactual"})
            if include:
                rows.append({"id": r["id"], "prompt": r["injection_prompt"], "completion": r["injection_output"],
                             "label": r["label"], "kind": "injected", "injection_text": r.get("injection_text", "")})
        out[split] = rows
    return out
