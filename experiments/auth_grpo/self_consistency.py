"""A vote over sampled answers (round twenty-two): each validation window answered greedily and by K samples at
temperature T, the verdict by majority (the greedy answer breaks ties), against greedy decoding.

    python experiments/auth_grpo/self_consistency.py windows <SFT model dir> [K=8] [T=0.7]
    python experiments/auth_grpo/self_consistency.py injection <analyst run dir> [K=8] [T=0.7] [constrained=1]

``windows``: the 43 validation windows' verdict macro-F1 (and how often any answer is right); ``injection``: issue 15's
attack success and clean accuracy on the injected validation triplets. Validation only: never used to choose on test.
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from sectune.evaluation import analyst_eval as ae
from sectune.evaluation import injection_eval as ie
from sectune.inference import generate
from sectune.stages.pipeline import compose

VERDICTS = ("benign", "suspicious", "malicious")


def sampled(model, tok, prompts, gen_cfg, k, temperature, constraint=None) -> list[list[str]]:
    cfg = OmegaConf.merge(gen_cfg, {"do_sample": True, "temperature": temperature, "top_p": 1.0})
    torch.manual_seed(0)
    return [generate(model, tok, prompts, cfg, batch_size=16, constraint=constraint) for _ in range(k)]


def vote(greedy: str | None, samples: list[str | None]) -> str | None:
    """The majority verdict of ``samples`` (None: no valid answer, never counted); the greedy one breaks ties."""
    c = collections.Counter(v for v in samples if v is not None)
    c[greedy] += 0.5
    return c.most_common(1)[0][0]


def windows(model_dir: str, k: int, temperature: float) -> None:
    cfg = compose(["+experiment=auth_grpo_tiny", "dataset.subwindows=1"])
    ws = ae.load_windows(cfg)["validation"]
    model, tok = ae.load_policy(cfg, "model", Path(model_dir))
    greedy = ae.generate_row("greedy", model, tok, ws, cfg, 16)
    rows = [ae.analyses_row(f"sample {j}", t, None) for j, t in enumerate(sampled(model, tok, [w.prompt for w in ws], cfg.generation, k, temperature))]
    print(f"greedy: verdict macro-F1 {ae.score(greedy, ws)['verdict_macro_f1']:.3f}")
    for kk in sorted({3, 5, k}):
        verdicts = [vote(greedy.verdicts[i], [r.verdicts[i] if r.verdicts[i] in VERDICTS else None for r in rows[:kk]]) for i in range(len(ws))]
        print(f"vote of {kk}: verdict macro-F1 {ae.score(ae.Row('vote', 'baseline', verdicts), ws)['verdict_macro_f1']:.3f}")
    right = [w.annotation["verdict"] for w in ws]
    print(f"some answer right: {sum(any(r.verdicts[i] == right[i] for r in rows + [greedy]) for i in range(len(ws))) / len(ws):.3f}, "
          f"greedy right: {sum(greedy.verdicts[i] == right[i] for i in range(len(ws))) / len(ws):.3f}")


def injection(run_dir: str, k: int, temperature: float, constrained: bool) -> None:
    from sectune.data.injection import triplet_data
    from sectune.stages import infer

    cfg = compose(["+experiment=auth_grpo_tiny", "logger=none", "train.precision=fp32", "generation.repetition_penalty=1.0",
                   "stage=evaluate", "dataset=injection_triplets", f"infer.constrained={str(constrained).lower()}",
                   f"evaluate.model_dir={run_dir}"])
    recs = triplet_data(cfg, need_train=False).splits["validation"]
    model, tok, _ = infer.load_model(cfg, ie.choose_analyst(run_dir))
    constraint = ie.schema_constraint(cfg, model, tok) if constrained else None
    prompts = [r["injection_prompt"] for r in recs] + [r["prompt"] for r in recs]

    def verdicts(texts):
        return [a["verdict"] if (a := ie.read_answer(t))["schema_valid"] else None for t in texts]

    greedy = verdicts(generate(model, tok, prompts, OmegaConf.merge(cfg.generation, {"do_sample": False}), batch_size=16, constraint=constraint))
    samples = [verdicts(t) for t in sampled(model, tok, prompts, cfg.generation, k, temperature, constraint)]
    n = len(recs)

    def rates(v):
        attacked = sum(v[i] != json.loads(r["injection_output"])["verdict"] for i, r in enumerate(recs)) / n
        return attacked, sum(v[n + i] == json.loads(r["output"])["verdict"] for i, r in enumerate(recs)) / n

    print("greedy: attack success %.3f, clean accuracy %.3f" % rates(greedy))
    for kk in sorted({3, 5, k}):
        print(f"vote of {kk}: attack success %.3f, clean accuracy %.3f" % rates([vote(greedy[i], [s[i] for s in samples[:kk]]) for i in range(2 * n)]))


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("windows", "injection"):
        sys.exit("usage: self_consistency.py windows|injection <run dir> [K] [T] [constrained 1|0]")
    mode, path, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    K, T = int(rest[0]) if rest else 8, float(rest[1]) if len(rest) > 1 else 0.7
    windows(path, K, T) if mode == "windows" else injection(path, K, T, (rest[2] if len(rest) > 2 else "1") == "1")
