"""Does the analyst count, or recognise names? SFT analysts and the table's TF-IDF + LR on the validation windows as
they are and with every user name, IP, host name, port, pid and timestamp renamed consistently
(sectune/data/log_edits.py: the rule engine gives every renamed window the same verdict and counts).
Source recall: the share of the rules' source IPs / hosts that the analyst's ``source_ips`` names exactly, which
only reading them out of the window (not remembering the training windows' attackers) gives on renamed windows.

    python experiments/auth_grpo/renamed_windows.py <auth_grpo_tiny run>/sft/model [more SFT model dirs...]
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from sectune.data import auth_logs
from sectune.data.auth_rewards import _sources
from sectune.data.log_edits import counterfactual_window
from sectune.evaluation import analyst_eval as ae
from sectune.stages.pipeline import compose


def source_recall(analyses: list, windows: list) -> float:
    """Of the rules' sources over the windows, the share the analysis names exactly."""
    hit = total = 0
    for a, w in zip(analyses, windows):
        named = {s["ip"] for s in _sources(a or {})}  # the field F1's own reading of source_ips
        for s in w.annotation["source_ips"]:
            total += 1
            hit += s["ip"] in named
    return hit / max(total, 1)


def main(model_dirs: list[str]) -> None:
    cfg = compose(["+experiment=auth_grpo_tiny", "dataset.subwindows=1"])
    windows = ae.load_windows(cfg)
    rng = random.Random(7)

    def renamed(w: ae.Window) -> ae.Window:
        text = counterfactual_window(w.log_text, rng)
        return ae.Window(w.id, w.source, auth_logs.render_prompt(text), text, auth_logs.analyze_auth_log(text.splitlines()))

    sets = {"as they are": windows["validation"]}
    sets["renamed"] = [renamed(w) for w in sets["as they are"]]
    assert [w.annotation["verdict"] for w in sets["renamed"]] == [w.annotation["verdict"] for w in sets["as they are"]]
    for path in model_dirs:
        model, tok = ae.load_policy(cfg, "model", Path(path))
        for name, ws in sets.items():
            row = ae.generate_row("model", model, tok, ws, cfg, 16)
            s = ae.score(row, ws)
            print(f"{path} | {name}: verdict macro-F1 {s['verdict_macro_f1']:.3f}, accuracy {s['verdict_accuracy']:.3f}, "
                  f"field F1 {s['field_f1']:.3f}, schema-valid {s['schema_valid_rate']:.3f}, "
                  f"source recall {source_recall(row.analyses, ws):.3f}")
    for name, ws in sets.items():
        s = ae.score(ae.tfidf_row(windows["train"], windows["validation"], ws, 42), ws)
        print(f"TF-IDF + LR | {name}: verdict macro-F1 {s['verdict_macro_f1']:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
