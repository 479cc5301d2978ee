"""Reward models: a trained Bradley-Terry scorer or the heuristic fallback, behind one interface.

* :func:`encode_pair_sequences` / :class:`PairRowCollator` / :func:`sequence_rewards`: how the
  reward stage scores sequences. A batch of B pairs is one padding-free row of 2B sequences
  (chosen₁, rejected₁, chosen₂, …) with ``position_ids`` restarting per sequence; attention stays
  within each sequence (:mod:`sectune.packed_attention`), and the one-output ``score`` head reads
  each sequence's last token (its EOS). One forward per batch, no padding but a multiple of 64.
* :class:`TrainedRewardModel` and :class:`HeuristicRewardModel` share ``score(prompts,
  completions) -> list[float]``; :func:`load_reward_model` opens either from a ``stage=reward``
  run dir (or its ``reward_model/`` folder), so later stages (RL) never ask which one they got.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import torch

from sectune.errors import ConfigError

META_FILE = "reward_model.json"
HEURISTIC_FILE = "heuristic_reward.json"
_LOGS_IN_PROMPT = re.compile(r"### Logs:\n(?P<logs>.*?)\n### Analysis:", re.S)


# ------------------------------------------------------------------------------- encoding


def encode_sequence(tokenizer, prompt: str, completion: str, max_length: int) -> tuple[list[int], int]:
    """prompt + completion + EOS as ids, cut from the prompt's start when too long (the completion,
    which the reward judges, is kept whole). Returns (ids, prompt tokens cut)."""
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    over = len(p) + len(c) - max_length
    if over > 0:
        if over >= len(p):
            c = c[-max_length:]
            return c, len(p)
        p = p[over:]
    return p + c, max(0, over)


def encode_pair_sequences(tokenizer, pairs: Sequence[dict], max_length: int) -> tuple[list[dict], int]:
    """Each pair as ``{"chosen_ids", "rejected_ids"}``; returns (rows, sequences whose prompt was cut)."""
    rows, cut = [], 0
    for p in pairs:
        c, cc = encode_sequence(tokenizer, p["prompt"], p["chosen"], max_length)
        r, rc = encode_sequence(tokenizer, p["prompt"], p["rejected"], max_length)
        cut += (cc > 0) + (rc > 0)
        rows.append({"chosen_ids": c, "rejected_ids": r})
    return rows, cut


class PairRowCollator:
    """B pairs → one ``[1, L]`` row of 2B sequences (chosen, rejected interleaved) + ``seq_ends``."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 64):
        self.pad, self.multiple = pad_token_id, pad_to_multiple_of

    def __call__(self, examples: list[dict]) -> dict:
        seqs = [s for ex in examples for s in (ex["chosen_ids"], ex["rejected_ids"])]
        return flat_row(seqs, self.pad, self.multiple)


def flat_row(seqs: Sequence[Sequence[int]], pad: int, multiple: int = 64) -> dict:
    ids, pos, ends = [], [], []
    for s in seqs:
        ids.extend(s)
        pos.extend(range(len(s)))
        ends.append(len(ids) - 1)
    extra = (-len(ids)) % multiple
    ids.extend([pad] * extra)
    pos.extend([0] * extra)  # one-token "documents" nothing real attends to
    return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([pos]), "seq_ends": torch.tensor(ends)}


def seq_cls_model(model):
    """The ``…ForSequenceClassification`` inside PEFT / accelerate wrappers."""
    inner = model.module if hasattr(model, "module") and not hasattr(model, "score") else model
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    if not isinstance(getattr(inner, "score", None), torch.nn.Module):
        raise ConfigError(f"the reward model needs a decoder …ForSequenceClassification with a `score` head; got {type(inner).__name__}")
    return inner


def sequence_rewards(model, input_ids: torch.Tensor, position_ids: torch.Tensor, seq_ends: torch.Tensor) -> torch.Tensor:
    """One scalar per sequence of a flat row: the score head on each sequence's last hidden state.

    Calls the decoder body (``base_model``: LlamaModel, GPT2Model, …) and the head directly, so the
    head runs on 2B positions instead of every token, and transformers' pad-token pooling (which
    would pick one position per row) is out of the way.
    """
    from sectune import packed_attention

    inner = seq_cls_model(model)
    batch = {"input_ids": input_ids, "position_ids": position_ids}
    with packed_attention.packed_segments(batch):
        hidden = inner.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
    return inner.score(hidden[0, seq_ends]).squeeze(-1).float()


# ------------------------------------------------------------------------------- scorers


def window_from_prompt(prompt: str) -> str:
    """The raw log lines inside an analyst prompt (the whole prompt when it is not one)."""
    m = _LOGS_IN_PROMPT.search(prompt)
    return m["logs"] if m else prompt


class HeuristicRewardModel:
    """Seed 000's fallback when memory is short: keyword score + JSON/schema validity + agreement
    with the rule engine (``sectune.data.auth_rewards.heuristic_reward``). Needs no weights."""

    kind = "heuristic"

    def __init__(self, spec: dict | None = None, where: str = "heuristic reward"):
        from sectune.data import auth_rewards

        self.spec = spec or auth_rewards.heuristic_spec()
        try:
            self._fn = auth_rewards.heuristic_from_spec(self.spec)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return [float(self._fn(window_from_prompt(p), c)) for p, c in zip(prompts, completions)]


class TrainedRewardModel:
    """A ``stage=reward`` adapter + head (or full model), scored in padding-free batches."""

    kind = "trained"

    def __init__(self, model, tokenizer, max_length: int, batch_size: int = 8):
        self.model, self.tokenizer, self.max_length, self.batch_size = model.eval(), tokenizer, max_length, batch_size

    @torch.no_grad()
    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        device = next(self.model.parameters()).device
        out: list[float] = []
        seqs = [encode_sequence(self.tokenizer, p, c, self.max_length)[0] for p, c in zip(prompts, completions)]
        for i in range(0, len(seqs), self.batch_size):
            row = flat_row(seqs[i : i + self.batch_size], self.tokenizer.pad_token_id)
            out.extend(sequence_rewards(self.model, *(row[k].to(device) for k in ("input_ids", "position_ids", "seq_ends"))).tolist())
        return out


def reward_model_dir(path: str | Path) -> Path:
    """A ``stage=reward`` run dir (via its result.json) or the ``reward_model/`` folder itself."""
    p = Path(path)
    if (p / META_FILE).is_file():
        return p
    result = p / "result.json"
    if result.is_file():
        res = json.loads(result.read_text())
        if res.get("stage") != "reward" or res.get("status") != "succeeded":
            raise ConfigError(f"{p}: not a succeeded stage=reward run (stage={res.get('stage')}, status={res.get('status')})")
        rel = res.get("artifacts", {}).get("reward_model")
        if rel and (p / rel / META_FILE).is_file():
            return p / rel
    raise ConfigError(f"{p}: no reward model there (expected a stage=reward run dir or a folder with {META_FILE})")


def load_reward_model(path: str | Path, cfg=None, batch_size: int = 8):
    """The scorer saved by ``stage=reward`` at ``path``; a missing head or adapter is a named error."""
    d = reward_model_dir(path)
    meta = json.loads((d / META_FILE).read_text())
    if meta.get("kind") == "heuristic":
        if not (d / HEURISTIC_FILE).is_file():
            raise ConfigError(f"{d}: {HEURISTIC_FILE} missing (the heuristic reward model's spec)")
        return HeuristicRewardModel(json.loads((d / HEURISTIC_FILE).read_text()), where=str(d / HEURISTIC_FILE))
    check_head(d)
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(d)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if (d / "adapter_config.json").is_file():
        base = AutoModelForSequenceClassification.from_pretrained(meta["base_model"], num_labels=1)
        base.config.pad_token_id = tokenizer.pad_token_id
        model = PeftModel.from_pretrained(base, d)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(d, num_labels=1)
    if cfg is not None:
        from sectune.modeling import to_run_device

        model = to_run_device(model, cfg)
    return TrainedRewardModel(model, tokenizer, int(meta["max_length"]), batch_size)


def check_head(d: Path) -> None:
    """The trained score head must be in the saved weights: without it the scores are random."""
    from safetensors import safe_open

    files = [d / "adapter_model.safetensors"] if (d / "adapter_config.json").is_file() else sorted(d.glob("model*.safetensors"))
    files = [f for f in files if f.is_file()]
    if not files:
        raise ConfigError(f"{d}: reward model weights missing (adapter_model.safetensors or model.safetensors)")
    for f in files:
        with safe_open(str(f), "pt") as st:
            if any(".score." in f".{k}" or k.startswith("score.") for k in st.keys()):
                return
    raise ConfigError(f"{d}: the reward model's score head is not in {files[0].name}; the run that wrote it did not save the head")
