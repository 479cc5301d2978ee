"""Packing must not change the loss: packed rows equal the same examples one by one."""

from __future__ import annotations

import torch

from conftest import compose
from sectune import engine, modeling


def test_packed_rows_give_the_same_loss_as_separate_examples():
    cfg = compose(["logger=none"])
    path = modeling.model_path(cfg)
    model = modeling.load_model(cfg, path=path).eval()
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(5, 2000, (n,), generator=g).tolist() for n in (7, 12, 5, 9)]
    # completion-only labels: the first 3 tokens of each doc are "prompt"
    def labels(ids):
        return [-100] * 3 + ids[3:]

    # separately: sum of per-token losses over completion tokens
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in docs:
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, :-1]
            tgt = torch.tensor(labels(ids)[1:])
            keep = tgt != -100
            total += torch.nn.functional.cross_entropy(logits[keep], tgt[keep], reduction="sum").item()
            count += int(keep.sum())
    expected = total / count

    # packed: two rows, two docs each, through the collator the SFT stage uses
    rows = [
        {"input_ids": docs[0] + docs[1], "labels": labels(docs[0]) + labels(docs[1]), "seq_lengths": [7, 12]},
        {"input_ids": docs[2] + docs[3], "labels": labels(docs[2]) + labels(docs[3]), "seq_lengths": [5, 9]},
    ]
    batch = engine.PackedRowsCollator(pad_token_id=0)(rows)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 2
    with torch.no_grad():
        out = model(**batch)
    assert abs(out.loss.item() - expected) < 1e-4, (out.loss.item(), expected)

    # and without the position ids the rows would leak across examples (the test can fail)
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss.item()
    assert abs(leaky - expected) > 1e-3
