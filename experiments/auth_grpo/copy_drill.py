"""Can the tiny analyst's model learn to copy an IP out of a log line at all, and at which learning rate?

A drill, not the task: a plain torch loop (no sectune training path) on the preset's tiny model (random weights, its
tokenizer), one log line in the prompt, ``{"ip":"<the line's IP>"}`` as the answer, a fresh random IP every example;
greedy copies of 20 fresh lines every 100 steps.

    python experiments/auth_grpo/copy_drill.py [learning rate, default 1e-3] [steps, default 600] [adamw|adafactor] [save dir]

``DRILL_OVERRIDES="model.tiny.num_layers=8"`` drills another shape of the preset's tiny model (Hydra overrides).
``DRILL_ANSWER=analysis`` makes the answer the analyst's: the SFT prompt and the rules' whole JSON analysis of the line
(its ``source_ips`` holds the IP); a copy then counts when the parsed answer's first source is the line's IP.
``DRILL_NOISE=k`` puts the line among k ``Connection closed by <another IP> [preauth]`` lines (no evidence: the
answer's source is still the accepted login's IP); ``DRILL_CURRICULUM=1`` trains the first half of the steps without them.

With a save dir the drilled weights and tokenizer are saved there (``model.name_or_path=<dir>`` starts an SFT from them).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time

import torch

from sectune.data import auth_logs
from sectune.inference import extract_json
from sectune.models import modeling
from sectune.stages.pipeline import compose


def main(lr: float, steps: int, optimizer: str, save: str | None = None) -> None:
    cfg = compose(["+experiment=auth_grpo_tiny", *os.environ.get("DRILL_OVERRIDES", "").split()])
    path = modeling.model_path(cfg)  # the preset's tiny model, built locally once
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    rng = random.Random(0)
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)

    analysis, noise = os.environ.get("DRILL_ANSWER") == "analysis", int(os.environ.get("DRILL_NOISE", "0"))
    lone_first = os.environ.get("DRILL_CURRICULUM") == "1"

    def new_ip() -> str:
        return f"{rng.randint(1, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"

    def example(noise: int = noise) -> tuple[str, str]:
        ip = new_ip()
        line = f"Dec 10 07:03:29 LabSZ sshd[24573]: Accepted password for bob from {ip} port 36058 ssh2"
        lines = [f"Dec 10 07:03:{(20 + i) % 60:02d} LabSZ sshd[{24560 + i}]: Connection closed by {new_ip()} [preauth]" for i in range(noise)]
        lines.insert(rng.randint(0, noise), line)
        if analysis:
            return auth_logs.render_prompt("\n".join(lines)), auth_logs.render_completion(auth_logs.analyze_auth_log(lines))
        line = "\n".join(lines)
        return f"### Logs:\n{line}\n### Analysis:\n", '{"ip":"' + ip + '"}'

    def copied(text: str, answer: str) -> bool:
        if not analysis:
            return text.strip() == answer
        try:
            return extract_json(text)["source_ips"][0]["ip"] == json.loads(answer)["source_ips"][0]["ip"]
        except (ValueError, KeyError, IndexError, TypeError):
            return False

    if optimizer == "adafactor":
        from transformers.optimization import Adafactor

        opt = Adafactor(model.parameters(), lr=lr, scale_parameter=False, relative_step=False)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(steps):
        ids, labels = [], []
        k = 0 if lone_first and step < steps // 2 else noise
        for p, c in (example(k) for _ in range(16)):
            pi, ci = tok(p)["input_ids"], tok(c)["input_ids"] + [tok.eos_token_id]
            ids.append(pi + ci)
            labels.append([-100] * len(pi) + ci)
        n = max(map(len, ids))
        x = torch.tensor([i + [tok.pad_token_id] * (n - len(i)) for i in ids])
        y = torch.tensor([lab + [-100] * (n - len(lab)) for lab in labels])
        mask = (torch.arange(n)[None, :] < torch.tensor([len(i) for i in ids])[:, None]).long()
        model.train()
        loss = model(input_ids=x, attention_mask=mask, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            model.eval()
            right = 0
            with torch.no_grad():
                for p, c in (example() for _ in range(20)):
                    enc = tok(p, return_tensors="pt")
                    out = model.generate(**enc, max_new_tokens=160 if analysis else 16, do_sample=False, pad_token_id=tok.pad_token_id)
                    right += copied(tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True), c)
            print(f"lr {lr:g} step {step}: loss {loss.item():.3f}, exact copies {right}/20 ({time.time() - t0:.0f} s)", flush=True)
    if save:
        model.save_pretrained(save)
        tok.save_pretrained(save)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(float(a[0]) if a else 1e-3, int(a[1]) if len(a) > 1 else 600, a[2] if len(a) > 2 else "adamw", a[3] if len(a) > 3 else None)
