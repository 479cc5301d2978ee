"""Records to token rows for the classify/evaluate stages and the predictor (``generative``: the prompt left-padded,
followed by the label's tokens; ``seq_cls``: the prompt right-cut). Re-exported by :mod:`sectune.training.classification`."""

from __future__ import annotations

import sys
from typing import List, Sequence

import torch

from sectune.errors import DataError


def label_token_ids(tokenizer, labels: Sequence[str]) -> List[List[int]]:
    """Each label as its answer tokens: `` label`` + eos (eos makes one label never a prefix of another)."""
    out = []
    for lab in labels:
        ids = tokenizer(" " + lab, add_special_tokens=False)["input_ids"]
        out.append(list(ids) + [tokenizer.eos_token_id])
    return out


def _prompt_ids(tokenizer, texts: Sequence[str], max_len: int, side: str) -> List[List[int]]:
    """Each text's ids, cut to ``max_len`` on ``side``, with a warning counting the cut ones (they were cut without a
    word: 4 of prompt_injection_cv's 116 test prompts, all injections, lost their end: an audit, session 36). An empty
    prompt is refused: it has nothing to classify (scored as 0.5/0.5 in a batch, a reshape error alone)."""
    from sectune.inference import text_ids

    old = tokenizer.truncation_side
    tokenizer.truncation_side = side  # generative keeps the prompt's end ("Label:"), seq_cls its start
    try:
        # a text's "</s>" or "<|endoftext|>" stays text, in training and scoring alike: an injected prompt (an attacker's)
        # wrote the tokenizer's control tokens into the classifier's input (an audit, session 42)
        ids = tokenizer(list(texts), truncation=True, max_length=max_len, split_special_tokens=True)["input_ids"]
    finally:
        tokenizer.truncation_side = old
    empty = [i for i, x in enumerate(ids) if not x]
    if empty:
        raise DataError(f"row {empty[0]}{f' (and {len(empty) - 1} more)' if len(empty) > 1 else ''}: an empty prompt has no "
                        "token to classify (an empty text, or dataset.prompt_template='')")
    cut = sum(len(x) >= max_len for x in ids) and sum(len(x) > max_len for x in text_ids(tokenizer, list(texts)))
    if cut:
        print(f"sectune: warning: {cut} of {len(ids)} prompt(s) longer than {max_len} tokens (model.max_seq_length) lost their "
              f"{'end' if side == 'right' else 'start'}", file=sys.stderr)
    return ids


def encode_examples(tokenizer, records: Sequence[dict], labels: Sequence[str], head: str, max_length: int,
                    keep_text: bool = False) -> List[dict]:
    """Token ids + targets per row; ``keep_text`` also keeps the text (and, ``generative``, the label's
    ids) so that :class:`sectune.models.subword.DropoutRows` can re-tokenize it with subword dropout."""
    index = {lab: i for i, lab in enumerate(labels)}
    texts = [r["text"] for r in records]
    ys = [index[r["label"]] for r in records]
    if head == "seq_cls":
        ids = _prompt_ids(tokenizer, texts, max_length, "right")
        rows = [{"input_ids": x, "labels": y, "class_index": y} for x, y in zip(ids, ys)]
    else:
        lab_ids = label_token_ids(tokenizer, labels)
        ids = _prompt_ids(tokenizer, texts, prompt_budget(tokenizer, labels, max_length), "left")
        rows = [{"input_ids": x + lab_ids[y], "labels": [-100] * len(x) + lab_ids[y], "class_index": y}
                for x, y in zip(ids, ys)]
    if keep_text:
        for row, t, y in zip(rows, texts, ys):
            row["text"] = t
            if head != "seq_cls":
                row["label_ids"] = lab_ids[y]
    return rows


def prompt_budget(tokenizer, labels: Sequence[str], max_length: int) -> int:
    """``generative``: the prompt's token budget, leaving room for the longest label."""
    return max(1, max_length - max(map(len, label_token_ids(tokenizer, labels))))


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids); position ids count real tokens only."""
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        if side == "left":
            ids[i, T - len(r):] = torch.tensor(r)
            mask[i, T - len(r):] = 1
        else:
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids, mask, pos


class ClassifyCollator:
    def __init__(self, pad_id: int, head: str):
        self.pad_id, self.head = pad_id, head

    def __call__(self, feats: List[dict]) -> dict:
        side = "right" if self.head == "seq_cls" else "left"
        ids, mask, pos = pad_rows([f["input_ids"] for f in feats], self.pad_id, side)
        batch = {"input_ids": ids, "attention_mask": mask, "class_index": torch.tensor([f["class_index"] for f in feats])}
        if self.head == "seq_cls":
            batch["labels"] = torch.tensor([f["labels"] for f in feats])
        else:
            batch["position_ids"] = pos
            batch["labels"], _, _ = pad_rows([f["labels"] for f in feats], -100, "left")
        return batch
