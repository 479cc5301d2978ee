"""Packing must not change the loss: packed rows equal the same examples one by one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import compose
from sectune.models import modeling
from sectune.training import engine, packed_attention


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

    # padding-free (the default): the four examples flattened into one row, padded only up to a
    # multiple of 16 here (64 by default); per-example attention runs at bucketed lengths too
    n = sum(map(len, docs))
    flat = engine.FlatBatchCollator(pad_token_id=0, pad_to_multiple_of=16)([{"input_ids": d, "labels": labels(d)} for d in docs])
    assert "attention_mask" not in flat and flat["input_ids"].shape == (1, 48)
    assert flat["position_ids"][0].tolist() == [p for d in docs for p in range(len(d))] + [0] * (48 - n)
    assert (flat["labels"][0, n:] == -100).all()
    packed_attention.install()
    with torch.no_grad(), packed_attention.packed_segments(flat):
        out = model(**flat)
    assert abs(out.loss.item() - expected) < 1e-4, (out.loss.item(), expected)

    # and without the position ids the rows would leak across examples (the test can fail)
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss.item()
    assert abs(leaky - expected) > 1e-3


def test_segments_from_position_ids_fold_trailing_padding():
    from sectune.training.packed_attention import segments_from_position_ids

    pos = torch.tensor([
        [0, 1, 2, 0, 1, 0, 0, 0],  # examples of 3 and 2 tokens, then 3 pad tokens
        [0, 1, 2, 3, 4, 5, 6, 7],  # one example filling the row
        [0, 1, 0, 1, 2, 3, 0, 1],  # three examples, no padding
    ])  # fmt: skip
    assert segments_from_position_ids(pos) == (((0, 3), (3, 8)), ((0, 8),), ((0, 2), (2, 6), (6, 8)))


def _packed_batch(model_cfg_overrides=()):
    cfg = compose(["logger=none", *model_cfg_overrides])
    model = modeling.load_model(cfg, path=modeling.model_path(cfg)).train()
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(5, 2000, (n,), generator=g).tolist() for n in (30, 17, 9, 40, 5)]
    rows = [
        {"input_ids": docs[0] + docs[1], "labels": docs[0] + docs[1], "seq_lengths": [30, 17]},
        {"input_ids": docs[2] + docs[3] + docs[4], "labels": docs[2] + docs[3] + docs[4], "seq_lengths": [9, 40, 5]},
    ]
    return model, engine.PackedRowsCollator(pad_token_id=0)(rows)


def test_per_example_attention_matches_the_block_diagonal_mask_forward_and_backward():
    """The fast path is the same computation: same loss, same gradients, only real-token rows compared."""
    from sectune.training import packed_attention

    packed_attention.install()
    model, batch = _packed_batch()
    assert batch["input_ids"].shape == (2, 56)  # 47 and 54 real tokens padded to a multiple of 8

    calls = []
    import torch.nn.functional as F

    real_sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*a, **kw):
        calls.append((tuple(a[0].shape), kw.get("is_causal"), kw.get("attn_mask")))
        return real_sdpa(*a, **kw)

    def loss_and_grads(fast: bool):
        model.zero_grad()
        calls.clear()
        F.scaled_dot_product_attention = counting_sdpa
        try:
            if fast:
                with packed_attention.packed_segments(batch):
                    loss = model(**batch).loss
                    loss.backward()
            else:
                loss = model(**batch).loss
                loss.backward()
        finally:
            F.scaled_dot_product_attention = real_sdpa
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, list(calls)

    slow_loss, slow_grads, slow_calls = loss_and_grads(False)
    fast_loss, fast_grads, fast_calls = loss_and_grads(True)
    layers = model.config.num_hidden_layers
    # slow: one masked call per layer over the whole rows; fast: one unmasked causal call per example span
    assert len(slow_calls) == layers and all(c[2] is not None for c in slow_calls)
    assert len(fast_calls) == layers * 5 and all(c[1] is True and c[2] is None for c in fast_calls)
    assert abs(fast_loss - slow_loss) < 1e-5, (fast_loss, slow_loss)
    assert slow_grads.keys() == fast_grads.keys()
    for n in slow_grads:
        torch.testing.assert_close(fast_grads[n], slow_grads[n], atol=1e-5, rtol=1e-4, msg=n)


def test_sliding_window_attention_keeps_transformers_masked_path():
    """Per-example causal attention would ignore a sliding window: such layers fall through, mask and all."""
    from types import SimpleNamespace

    from sectune.training.packed_attention import _per_example_sdpa
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 4, generator=g) for _ in range(3))
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]])
    window = torch.tril(torch.ones(8, 8, dtype=torch.bool)) & ~torch.tril(torch.ones(8, 8, dtype=torch.bool), -2)
    mask = (window & (pos[0, :, None] >= pos[0, None, :]) & (torch.arange(8)[:, None] // 5 == torch.arange(8)[None, :] // 5))[None, None]
    plain = SimpleNamespace(is_causal=True, training=False, num_key_value_groups=1)
    windowed = SimpleNamespace(is_causal=True, training=False, num_key_value_groups=1, sliding_window=2)
    with packed_attention.packed_segments({"position_ids": pos}):
        fast, _ = _per_example_sdpa(plain, q, k, v, mask)
        kept, _ = _per_example_sdpa(windowed, q, k, v, mask)
        kept_kw, _ = _per_example_sdpa(plain, q, k, v, mask, sliding_window=2)
    expected, _ = sdpa_attention_forward(windowed, q, k, v, mask)
    torch.testing.assert_close(kept, expected)
    torch.testing.assert_close(kept_kw, expected)
    assert not torch.allclose(fast, expected, atol=1e-3)  # the per-example path (full causal) would differ


def test_attention_outside_the_packed_context_is_plain_sdpa():
    """Generation and padded batches must not see the fast path: same logits with and without it installed."""
    from sectune.training import packed_attention
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import AttentionInterface

    packed_attention.install()
    model, batch = _packed_batch()
    model.eval()
    ids = batch["input_ids"][:, :20]
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        AttentionInterface._global_mapping["sdpa"] = sdpa_attention_forward
        try:
            ref = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        finally:
            AttentionInterface._global_mapping["sdpa"] = packed_attention._per_example_sdpa
    assert torch.equal(ours, ref)


def test_compact_fused_lm_head_scores_only_labelled_positions_with_the_same_loss():
    import trl.trainer.utils as trl_utils
    from trl.trainer.utils import add_fused_lm_head

    from sectune.training import packed_attention

    model, batch = _packed_batch()
    labels = batch["labels"].clone()
    labels[:, :10] = -100  # a "prompt" at the start of each row
    batch = {**batch, "labels": labels}
    add_fused_lm_head(model, outputs=("log_probs",))
    seen = []
    real_apply = trl_utils._ChunkedLogProbFunction.apply

    def spy(hidden, *a):
        seen.append(hidden.shape[0])
        return real_apply(hidden, *a)

    original = trl_utils._use_triton
    trl_utils._ChunkedLogProbFunction.apply = spy
    # TRL's own CPU decision (every position), even when an earlier test in this process compacted it already
    trl_utils._use_triton = lambda device: False
    try:
        with torch.no_grad():
            full = model(**batch, fused_lm_head=True).loss.item()
            assert packed_attention.compact_fused_lm_head()
            compact = model(**batch, fused_lm_head=True).loss.item()
    finally:
        trl_utils._ChunkedLogProbFunction.apply = real_apply
        trl_utils._use_triton = original
    n_rows, length = labels.shape
    n_labelled = int((labels[:, 1:] != -100).sum())
    assert seen == [n_rows * (length - 1), n_labelled] and n_labelled < n_rows * (length - 1) - 20
    assert abs(full - compact) < 1e-5


def test_real_tokens_counts_rows_up_to_their_trailing_padding():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 0], [0, 1, 2, 3, 4, 5, 6, 7], [0, 0, 0, 0, 0, 0, 0, 0]])
    assert engine.real_tokens(pos) == 5 + 8 + 0


@pytest.mark.parametrize("packing", ["padding_free", "bfd"])
def test_sft_batches_and_num_tokens_follow_train_packing(tmp_path, packing):
    """padding_free: batch_size examples in one row, no padding; bfd: batch_size packed rows.

    TRL alone would count one row per mask-free batch; sectune counts every real token.
    """
    from conftest import compose as compose_cfg
    from sectune import data
    from sectune.stages.sft import build_sft_trainer

    cfg = compose_cfg(["logger=none", "lora=none", "train.max_steps=1", "train.batch_size=4", "dataset.max_samples=12",
                       "train.device=cpu", f"train.packing={packing}"])
    path = modeling.model_path(cfg)
    tok = modeling.load_tokenizer(cfg, path)
    records = data.sft_records(cfg)
    trainer = build_sft_trainer(cfg, modeling.load_model(cfg, path=path), tok, records, [], tmp_path)
    fed = []
    collate = trainer.data_collator
    trainer.data_collator = lambda ex: fed.append(collate(ex)) or fed[-1]
    trainer.train()
    logged = [r["num_tokens"] for r in trainer.state.log_history if "num_tokens" in r]
    batch = fed[0]
    real = engine.real_tokens(batch["position_ids"])
    assert logged[-1] == real
    if packing == "padding_free":
        width = batch["input_ids"].shape[1]
        assert batch["input_ids"].shape[0] == 1 and width % 64 == 0 and 0 <= width - real < 64
        assert int((batch["position_ids"][0, :real] == 0).sum()) == 4  # four examples, then only padding
        assert (batch["input_ids"][0, :real] != tok.pad_token_id).all() and (batch["input_ids"][0, real:] == tok.pad_token_id).all()
    else:
        assert batch["input_ids"].shape[0] == 4 and int((batch["position_ids"] == 0).sum()) > 4  # rows hold several examples
        assert real > batch["input_ids"].shape[1]


def test_unknown_packing_mode_is_a_clear_error():
    from sectune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train.packing='rows'.*padding_free, bfd, none"):
        engine.packing_mode(compose(["train.packing=rows"]))
    assert engine.group_by_length(compose([])) is False  # padding-free: random batches, as TRL's
    assert engine.group_by_length(compose(["train.packing=none"])) is True
    assert engine.group_by_length(compose(["train.packing=none", "train.group_by_length=false"])) is False
    # classify: random batches unless asked (grouping measured worse on the injections)
    assert engine.group_by_length(compose(["stage=classify", "train.packing=none"])) is False
    assert engine.group_by_length(compose(["stage=classify", "train.group_by_length=true"])) is True


def test_selective_checkpointing_recomputes_elementwise_ops_only_with_the_same_gradients():
    """train.selective_checkpointing: backward re-runs SiLU (recomputed) but no matmul (cached); same grads."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from sectune.training import packed_attention

    packed_attention.install()
    cfg = compose(["logger=none", "lora=none", "train.selective_checkpointing=true"])

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]
            self.ops[name] = self.ops.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    def run(selective: bool):
        model, batch = _packed_batch()
        if selective:
            assert engine.selective_checkpointing(model, cfg)
        fwd, bwd = Count(), Count()
        with packed_attention.packed_segments(batch):
            with fwd:
                loss = model(**batch).loss
            with bwd:
                loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters()}, fwd.ops, bwd.ops

    base_loss, base_grads, _, base_bwd = run(False)
    loss, grads, fwd, bwd = run(True)
    assert abs(loss - base_loss) < 1e-6
    for n in base_grads:
        torch.testing.assert_close(grads[n], base_grads[n], atol=1e-6, rtol=1e-5, msg=n)
    assert base_bwd.get("silu", 0) == 0 and bwd.get("silu", 0) == fwd["silu"] > 0  # recomputed in backward
    assert bwd.get("mm", 0) == base_bwd["mm"]  # only the gradient matmuls: no forward matmul re-run
    sdpa = "_scaled_dot_product_flash_attention_for_cpu"
    assert bwd.get(sdpa, 0) == 0 and fwd[sdpa] > 0  # attention outputs cached, not recomputed


@pytest.mark.parametrize("checkpointing", ["selective", "full"])
def test_checkpoint_recompute_on_another_thread_keeps_per_example_attention(checkpointing):
    """On CUDA, autograd runs backward (and the checkpoint recompute) on its own device thread. The
    packed segments must be seen there: a recompute without them ran whole-row attention (a shape
    error with selective checkpointing, a CheckpointError with full). Emulated on CPU by running
    backward on a second thread while the training step's context is open, as on a GPU."""
    import threading

    packed_attention.install()
    cfg = compose(["logger=none", "lora=none", "train.selective_checkpointing=true"])

    def grads(recompute_on_thread: bool):
        model, batch = _packed_batch()
        if recompute_on_thread:
            if checkpointing == "full":
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                assert engine.selective_checkpointing(model, cfg)
        errors = []
        with packed_attention.packed_segments(batch):
            loss = model(**batch).loss
            if recompute_on_thread:
                def backward():
                    try:
                        loss.backward()
                    except Exception as e:  # noqa: BLE001 - reported below
                        errors.append(e)

                t = threading.Thread(target=backward)
                t.start()
                t.join()
            else:
                loss.backward()
        assert not errors, errors
        return {n: p.grad for n, p in model.named_parameters()}

    expected, got = grads(False), grads(True)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], atol=1e-5, rtol=1e-4, msg=n)


def test_full_checkpointing_takes_precedence_over_the_selective_default():
    cfg = compose(["logger=none", "train.gradient_checkpointing=true"])
    assert cfg.train.selective_checkpointing is True  # the default
    assert engine.training_kwargs(cfg, Path("/tmp/unused"), has_eval=False)["activation_checkpointing"] is True
    model = modeling.load_model(cfg, path=modeling.model_path(cfg))
    assert engine.selective_checkpointing(model, cfg) is False
    assert engine.selective_checkpointing(model, compose(["logger=none"])) is True
    assert engine.selective_checkpointing(model, compose(["logger=none", "train.selective_checkpointing=false"])) is False


def test_sft_label_smoothing_is_applied_to_the_completion_tokens(tmp_path):
    """loss.label_smoothing (loss=causal_lm) reaches SFT: (1 - e) * NLL + e * mean over the vocabulary of -log p,
    averaged over the completion tokens only (the prompt's labels are -100), as transformers' LabelSmoother."""
    from conftest import compose as compose_cfg
    from sectune import data
    from sectune.stages.sft import build_sft_trainer

    eps = 0.2
    losses, batch = {}, None
    for e in (0.0, eps):
        cfg = compose_cfg(["logger=none", "lora=none", "train.max_steps=1", "train.batch_size=2", "dataset.max_samples=6",
                           "train.device=cpu", "train.precision=fp32", f"loss.label_smoothing={e}"])
        path = modeling.model_path(cfg)
        tok = modeling.load_tokenizer(cfg, path)
        torch.manual_seed(0)
        model = modeling.load_model(cfg, path=path)
        trainer = build_sft_trainer(cfg, model, tok, data.sft_records(cfg), [], tmp_path / str(e))
        assert trainer.args.label_smoothing_factor == e
        if batch is None:
            batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
        model.eval()
        with torch.no_grad():
            losses[e] = trainer.compute_loss(model, dict(batch)).item()
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits.float()
    labels = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    keep = labels != -100
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep].mean()
    uniform = -logp.mean(dim=-1)[keep].mean()
    assert losses[0.0] == pytest.approx(nll.item(), rel=1e-4)
    assert losses[eps] == pytest.approx(((1 - eps) * nll + eps * uniform).item(), rel=1e-4)


def test_neftune_noise_alpha_reaches_the_trainer():
    kwargs = engine.training_kwargs(compose(["train.neftune_noise_alpha=5"]), Path("/tmp/unused"), has_eval=False)
    assert kwargs["neftune_noise_alpha"] == 5
    assert engine.training_kwargs(compose([]), Path("/tmp/unused"), has_eval=False)["neftune_noise_alpha"] is None
