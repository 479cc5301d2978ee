"""Seeded BPE-dropout (subword regularization, Provilkov et al. 2020) for ``classify.subword_dropout``.

In every epoch each training row is re-tokenized with every applicable BPE merge skipped with
probability ``p``, so the model sees the same text cut into different, smaller pieces ("ign ore",
"i gnore" …), the way obfuscated prompts and logs cut it. Validation, test and the Predictor keep
the tokenizer's own deterministic tokenization.

``tokenizers`` has BPE dropout built in (``models.BPE(dropout=p)``), but it draws from an unseeded
thread-local generator: runs would not be reproducible from ``train.seed``. This module applies the
same merges from the tokenizer's own ``tokenizer.json`` with a numpy generator instead; with
``p = 0`` it returns exactly the tokenizer's ids (``tests/test_subword.py``). Row ``i`` in epoch ``e``
draws from a generator seeded with ``(train.seed, e, i)``: the segmentation does not depend on batch
order, prefetching, data-loader workers or accumulation, and a resumed run redraws exactly what the
uninterrupted run drew.
"""

from __future__ import annotations

import json
from typing import List, Optional, Sequence

import numpy as np

import torch
from transformers import TrainerCallback

from sectune.errors import ConfigError


class SubwordDropout:
    """``encode(text, rng)`` → token ids with BPE merges dropped at ``p`` (special tokens as the
    tokenizer adds them, truncated to ``max_length`` on ``side`` like the deterministic path)."""

    def __init__(self, tokenizer, p: float, max_length: Optional[int] = None, side: str = "right"):
        what = "classify.subword_dropout"
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"{what}={p}: a probability in [0, 1) (0 turns it off; 0.1 is the paper's value)")
        backend = getattr(tokenizer, "backend_tokenizer", None)
        spec = json.loads(backend.to_str()) if backend is not None else {}
        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            kind = model.get("type") or f"a slow {type(tokenizer).__name__}"
            raise ConfigError(f"{what}={p} needs a fast BPE tokenizer; {tokenizer.name_or_path} is {kind}")
        self.p, self.max_length, self.side = float(p), max_length, side
        self.vocab = model["vocab"]
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.prefix = model.get("continuing_subword_prefix") or ""
        self.suffix = model.get("end_of_word_suffix") or ""
        self.byte_fallback = bool(model.get("byte_fallback"))
        self.ignore_merges = bool(model.get("ignore_merges"))
        self.unk_id = self.vocab.get(model["unk_token"]) if model.get("unk_token") else None
        self.normalizer, self.pre_tokenizer = backend.normalizer, backend.pre_tokenizer
        # the special ids the tokenizer's post-processor puts before and after a text (BOS, EOS)
        full, plain = tokenizer("x")["input_ids"], tokenizer("x", add_special_tokens=False)["input_ids"]
        k = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
        self.head_ids, self.tail_ids = full[:k], full[k + len(plain):]

    # -- one word ---------------------------------------------------------------------------------
    def _merge(self, word: str, rng: np.random.Generator) -> List[str]:
        """Greedy BPE on one pre-tokenized word: at each step every candidate merge is dropped with
        probability ``p``, the lowest-ranked surviving one is applied; none survives → stop."""
        if self.ignore_merges and self.p == 0 and word in self.vocab:  # Llama-3-style tokenizers
            return [word]
        syms = [c if i == 0 else self.prefix + c for i, c in enumerate(word)]
        if self.suffix and syms:
            syms[-1] += self.suffix
        while len(syms) > 1:
            cands = sorted((r, i) for i in range(len(syms) - 1)
                           if (r := self.ranks.get((syms[i], syms[i + 1]))) is not None)
            if not cands:
                break
            if self.p > 0:
                keep = rng.random(len(cands)) >= self.p
                cands = [c for c, k in zip(cands, keep) if k]
                if not cands:
                    break
            _, i = cands[0]
            right = syms[i + 1][len(self.prefix):] if self.prefix else syms[i + 1]
            syms[i:i + 2] = [syms[i] + right]
        return syms

    def _ids(self, sym: str) -> List[int]:
        if sym in self.vocab:
            return [self.vocab[sym]]
        if self.byte_fallback:
            ids = [self.vocab.get(f"<0x{b:02X}>") for b in sym.encode("utf-8")]
            if all(i is not None for i in ids):
                return ids
        if self.unk_id is None:
            raise ConfigError(f"subword dropout: {sym!r} is not in the vocabulary and the tokenizer has no unk token")
        return [self.unk_id]

    # -- one text ---------------------------------------------------------------------------------
    def encode(self, text: str, rng: np.random.Generator) -> List[int]:
        norm = self.normalizer.normalize_str(text) if self.normalizer is not None else text
        words = self.pre_tokenizer.pre_tokenize_str(norm) if self.pre_tokenizer is not None else [(norm, None)]
        body = [i for w, _ in words for s in self._merge(w, rng) for i in self._ids(s)]
        head, tail = self.head_ids, self.tail_ids
        if self.max_length is not None and len(head) + len(body) + len(tail) > self.max_length:
            room = max(0, self.max_length - len(head) - len(tail))
            body = body[:room] if self.side == "right" else body[len(body) - room:]
        return head + body + tail


class DropoutRows(torch.utils.data.Dataset):
    """Training rows from :func:`sectune.training.classify_encoding.encode_examples` (``keep_text=True``) whose
    token ids are redrawn with ``dropout`` on every access, from a generator seeded with
    ``(seed, epoch, row)``; :meth:`callback` keeps ``epoch`` in step with the Trainer's."""

    def __init__(self, rows: Sequence[dict], dropout: SubwordDropout, seed: int, head: str):
        self.rows, self.dropout, self.seed, self.head, self.epoch = list(rows), dropout, int(seed), head, 0

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, i: int) -> dict:
        f = self.rows[i]
        x = self.dropout.encode(f["text"], np.random.default_rng([self.seed, self.epoch, int(i)]))
        out = {k: v for k, v in f.items() if k not in ("text", "label_ids")}
        if self.head == "seq_cls":
            return {**out, "input_ids": x}
        lab = f["label_ids"]
        return {**out, "input_ids": x + lab, "labels": [-100] * len(x) + lab}

    def callback(self) -> TrainerCallback:
        rows = self

        class _Epoch(TrainerCallback):
            def on_epoch_begin(self, args, state, control, **kw):
                # state.epoch is the float epoch reached so far (an integer at an epoch boundary, the
                # checkpoint's value when resuming mid-epoch): its floor is the epoch about to run
                rows.set_epoch(int(np.floor((state.epoch or 0.0) + 1e-9)))

        return _Epoch()
