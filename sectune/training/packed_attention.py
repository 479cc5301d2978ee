"""Two CPU/SDPA fast paths for packed SFT rows, both numerically the same computation.

1. **Per-example attention.** A packed or flattened row of ``L`` tokens holding examples of lengths
   ``n1, n2, …`` needs ``Σ nᵢ²/2`` attention work, but SDPA given transformers' block-diagonal
   mask computes all ``L²`` scores and then masks them (on CPU the masked flash kernel cannot
   skip blocks). While :func:`packed_segments` is active, the ``sdpa`` attention function runs
   one causal SDPA call per example instead. Outside that context (generation, KV caches,
   padded batches, other trainers) it is transformers' own ``sdpa_attention_forward``,
   untouched. FlashAttention-2 users do not need this: FA2 already reads the per-example
   boundaries from ``position_ids``.
2. **Answer-only LM head.** TRL's fused LM head scores only the completion positions on
   Triton devices but every position (prompt and padding included) elsewhere, to keep tile
   shapes static for compilers. sectune runs eagerly, so it scores only the positions that
   carry a label everywhere (:func:`compact_fused_lm_head`).

Measured by ``bench/sft_throughput.py`` (README, "Measured figures").
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from sectune.training.engine import real_lengths

#: The active batch's rows: a plain module global, not a ContextVar. On CUDA the autograd engine runs
#: backward (checkpoint recompute included) on its own device thread, which does not see the caller's
#: context variables: the recompute then fell back to whole-row attention, and every padding-free
#: SFT step on a GPU failed (a shape error under selective checkpointing, a CheckpointError under full).
_ACTIVE: list[_Rows | None] = [None]
_INSTALLED = False
#: per-example attention lengths are rounded up to a multiple of this on CPU (see _per_example_sdpa)
BUCKET = 64


@dataclass(frozen=True)
class _Rows:
    length: int
    segments: tuple[tuple[tuple[int, int], ...], ...]  # per row: (start, end) of each example


def segments_from_position_ids(position_ids: torch.Tensor) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Per row, the ``(start, end)`` spans of its examples: a span starts wherever the position is 0.

    Padding at the end of a row has position 0 on every token (one-token "documents"); that tail is
    folded into the span before it. Causality keeps this exact for every real token: a token only
    attends to earlier ones, and the pad tokens after it carry no label.
    """
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be [batch, length], got shape {tuple(position_ids.shape)}")
    position_ids = position_ids.detach().cpu()
    length = position_ids.shape[1]
    rows = []
    for row, real in zip(position_ids, real_lengths(position_ids).tolist()):
        starts = [0, *(i for i in (row[:real] == 0).nonzero().flatten().tolist() if i > 0)]
        rows.append(tuple(zip(starts, [*starts[1:], length])))
    return tuple(rows)


@contextlib.contextmanager
def packed_segments(inputs: dict):
    """Run attention per example for this batch (training step or evaluation step, backward included).

    Active only for the layouts :class:`sectune.training.engine.FlatBatchCollator` and
    :class:`sectune.training.engine.PackedRowsCollator` produce: ``position_ids`` restarting per example and
    no ``attention_mask``. Anything else leaves attention as it is.
    """
    pos = inputs.get("position_ids")
    if pos is None or inputs.get("attention_mask") is not None or pos.dim() != 2:
        yield
        return
    previous = _ACTIVE[0]
    _ACTIVE[0] = _Rows(pos.shape[1], segments_from_position_ids(pos))
    try:
        yield
    finally:
        _ACTIVE[0] = previous


def _per_example_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    rows = _ACTIVE[0]
    usable = (
        rows is not None
        and query.shape[0] == len(rows.segments)
        and query.shape[2] == key.shape[2] == rows.length
        and is_causal is not False
        and getattr(module, "is_causal", True)
        and kwargs.get("position_bias") is None
        and kwargs.get("cache") is None
        and kwargs.get("softcap") is None
        # a sliding window limits attention inside an example too: that needs transformers' mask
        and kwargs.get("sliding_window") is None
        and getattr(module, "sliding_window", None) is None
    )
    if not usable:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    # One split of the flattened [B·L, heads, dim] tokens into examples: in backward that is a
    # single concatenation. Slicing each row and then each span instead costs a zero-filled
    # full-size gradient per slice, which took ~11% of a CPU step.
    sizes = [e - s for spans in rows.segments for s, e in spans]
    qs, ks, vs = (t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]).split(sizes) for t in (query, key, value))
    parts = []
    for q, k, v, n in zip(qs, ks, vs, sizes):
        # On CPU each example runs at a length rounded up to a multiple of BUCKET: oneDNN compiles and
        # keeps kernels per attention length (~6 MiB each), so every new length would grow memory.
        # Causal attention makes this exact: no real token attends to the zero rows after it.
        extra = (-n) % BUCKET if q.device.type == "cpu" else 0
        if extra:
            q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, 0, 0, extra)) for t in (q, k, v))
        o = sdpa(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa)[0]
        parts.append(o.transpose(0, 1)[:n] if extra else o.transpose(0, 1))
    out = torch.cat(parts) if len(parts) > 1 else parts[0]
    return out.reshape(query.shape[0], rows.length, query.shape[1], query.shape[3]), None


def _skip_mask_when_per_example(batch_size, q_length, kv_length, *args, local_size=None, attention_mask=None, **kwargs):
    """transformers' ``sdpa`` mask, except for a packed batch that :func:`_per_example_sdpa` will run
    one example at a time: that never reads the mask, and building it costs O(L²) memory and time
    (a 69M-element boolean mask and ~1 s of fills and copies for an 8k-token row on CPU).
    A sliding-window or chunked layer (``local_size``) still gets its mask: per-example attention
    does not run there."""
    from transformers.masking_utils import sdpa_mask

    rows = _ACTIVE[0]
    if rows is not None and local_size is None and attention_mask is None and batch_size == len(rows.segments) \
            and q_length == kv_length == rows.length:
        return None
    return sdpa_mask(batch_size, q_length, kv_length, *args, local_size=local_size, attention_mask=attention_mask, **kwargs)


def install() -> None:
    """Route ``sdpa`` through :func:`_per_example_sdpa` (a pass-through outside :func:`packed_segments`)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register("sdpa", _per_example_sdpa)
    AttentionMaskInterface.register("sdpa", _skip_mask_when_per_example)
    _INSTALLED = True


def compact_fused_lm_head() -> bool:
    """Make TRL's fused LM head score only labelled positions on every device (see module doc).

    TRL decides with ``trl.trainer.utils._use_triton(device)``, used there for that decision only
    (its kernels import their own copy). Returns False, leaving TRL as it is, if that name moved.
    """
    import trl.trainer.utils as trl_utils

    if not callable(getattr(trl_utils, "_use_triton", None)):
        return False
    trl_utils._use_triton = _always_compact
    return True


def _always_compact(device) -> bool:
    return True
