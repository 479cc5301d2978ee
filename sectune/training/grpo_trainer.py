"""TRL's GRPOTrainer with the G completions of a prompt sharing that prompt: sampled from one prefill, scored in one row.

TRL (1.16, transformers ``generate`` path) repeats every prompt G times: the generation batch prefills
B·G copies of each prompt, and every loss, reference and old-policy forward runs B·G left/right-padded
``[prompt + completion]`` rows. For the analyst the prompt (a log window, ~560 tokens) is 5× its answer,
so most of that work is the same prompt done G times. :class:`SharedPromptGRPOTrainer` changes two methods (and
tokenizes a prompt's text as text, :func:`sectune.inference.text_ids`, where TRL read a ``</s>`` in a log as the token):

* ``_generate_single_turn``: :func:`sample_shared_prompt` prefills each distinct prompt once, copies its KV
  cache to the G rows and samples token by token (temperature, top-k, top-p as ``generate`` applies them;
  multinomial from torch's global generator), writing each new token's keys and values into buffers sized
  for the whole completion (:func:`preallocated_cache`) rather than re-concatenating the cache every step.
  On a CPU only (on a GPU, transformers ``generate`` was measured 2x faster and TRL samples). The LoRA adapter is
  folded into its base weights while it samples (:func:`sectune.models.modeling.merged_lora`:
  one matmul per linear layer instead of three; the base weights are put back bit for bit).
* ``_get_per_token_logps_and_entropies``: :func:`shared_prompt_logps` lays each group out as one row,
  ``prompt, completion_1, …, completion_G``, no padding, with position ids that restart after the prompt
  for every completion and a block mask (a 4-D boolean ``attention_mask``, which transformers passes to
  attention as it is): the prompt is causal, each completion sees the whole prompt and itself (causal),
  never another completion. The hidden state of the prompt's last token predicts every completion's
  first token. The per-token log-probs (and entropies) come back in TRL's ``[B, T]`` layout, so TRL's
  ``_compute_loss`` (the GRPO objective, :func:`sectune.losses.grpo_loss`) is untouched.

Both are the same computation as TRL's, rearranged: RoPE scores depend only on relative positions, a
masked key is never attended, tests/test_rl.py checks the log-probs against TRL's own. Anything these
paths do not cover (multimodal inputs, vLLM, min-p, softcapped logits, an entropy bonus,
attention other than SDPA/eager, and the scoring pass under several processes) goes through TRL's code unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from trl import GRPOTrainer

from sectune.models.modeling import merged_lora
from sectune.training.samplers import epoch_seeded

MASKABLE_ATTENTION = ("sdpa", "eager")


# --------------------------------------------------------------------------------- generation
def _groups_of_equal_neighbours(prompt_ids: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """TRL's sampler lays each prompt's G copies next to each other: (distinct prompts, copies of each)."""
    unique, counts = [], []
    for ids in prompt_ids:
        ids = list(ids)
        if unique and ids == unique[-1]:
            counts[-1] += 1
        else:
            unique.append(ids)
            counts.append(1)
    return unique, counts


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """One token per row: logits / temperature, then top-k, then top-p (nucleus), as ``generate`` orders them."""
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked before it already hold top_p of the mass (the first always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    try:
        return torch.multinomial(logits.softmax(-1), 1).squeeze(-1)
    except RuntimeError as e:  # NaN/inf logits: a traceback from the sampler was all a user saw (an audit, session 36)
        if "contains either" not in str(e) or "nan" not in str(e):
            raise
        from sectune.errors import SectuneError

        raise SectuneError("rl: the policy's next-token scores are NaN or inf while sampling completions: its weights are "
                           "broken (a learning rate too high, or a policy that started broken: check rl.init_from's run)") from None


@torch.no_grad()
def sample_shared_prompt(
    model,
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int,
    eos_token_ids: list[int],
    pad_token_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
) -> list[list[int]]:
    """A completion for every row of ``prompt_ids`` (copies of a prompt next to each other), each up to and
    including its first EOS: every distinct prompt is prefilled once and its KV cache copied to its rows.
    ``repetition_penalty`` as transformers' processor applies it, before the temperature: the logit of every token
    already in the row (its padded prompt included, as generate's input_ids hold it) divided by it, or times it
    when negative."""
    unique, counts = _groups_of_equal_neighbours(prompt_ids)
    device = next(model.parameters()).device
    width = max(len(p) for p in unique)
    ids = torch.full((len(unique), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(unique), width), dtype=torch.long)
    for i, p in enumerate(unique):  # left padding, as generate pads
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = preallocated_cache(model.config, width + max_new_tokens)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position, cache=cache, use_cache=True, logits_to_keep=1)
    rows = torch.arange(len(unique), device=device).repeat_interleave(torch.tensor(counts, device=device))
    cache = out.past_key_values
    cache.batch_select_indices(rows)  # the G rows of a prompt share its prefill
    logits, mask = out.logits[rows, -1], mask[rows]
    next_position = position[rows, -1:] + 1
    eos = torch.tensor(eos_token_ids, device=device)
    done = torch.zeros(len(rows), dtype=torch.bool, device=device)
    penalty = float(repetition_penalty or 1.0)
    seen = None
    if penalty != 1.0:  # [rows, vocab]: the tokens each row holds so far
        seen = torch.zeros((len(rows), logits.shape[-1]), dtype=torch.bool, device=device)
        seen.scatter_(1, ids[rows], True)
    tokens = []
    for _ in range(max_new_tokens):
        if seen is not None:
            logits = logits.float()
            logits = torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)
        tok = torch.where(done, pad_token_id, sample_next(logits, temperature, top_k, top_p))
        if seen is not None:
            seen[torch.arange(len(rows), device=device), tok] = True
        tokens.append(tok)
        done |= torch.isin(tok, eos)
        if bool(done.all()) or len(tokens) == max_new_tokens:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_position, cache=cache, use_cache=True)
        logits, next_position = out.logits[:, -1], next_position + 1
    completions = []
    for row in torch.stack(tokens, dim=1).tolist():
        cut = next((i for i, t in enumerate(row) if t in eos_token_ids), None)
        completions.append(row[: cut + 1] if cut is not None else row)
    return completions


def preallocated_cache(config, capacity: int):
    """A KV cache whose layers write each new token into buffers sized for the whole completion, instead of
    DynamicCache's ``torch.cat`` of the whole cache at every step (which copied ~15 MB per layer and step on the
    bench's 21M Llama: half the decode time). Models with sliding-window or non-attention layers get
    transformers' DynamicCache."""
    from transformers import Cache, DynamicCache

    text = config.get_text_config()
    types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    if getattr(text, "sliding_window", None) or any(t != "full_attention" for t in types):
        return DynamicCache(config=config)
    return Cache(layers=[_PreallocatedLayer(capacity) for _ in range(text.num_hidden_layers)])


def _dynamic_layer():
    from transformers.cache_utils import DynamicLayer

    return DynamicLayer


class _PreallocatedLayer(_dynamic_layer()):
    """DynamicLayer semantics (``keys``/``values`` hold exactly the cached positions) over preallocated buffers."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            b, h, _, d = key_states.shape
            self._k = key_states.new_empty((b, h, self.capacity, d))
            self._v = value_states.new_empty((b, h, self.capacity, value_states.shape[-1]))
            self.device, self.is_initialized = key_states.device, True
        n = key_states.shape[-2]
        if self.length + n > self.capacity:
            raise RuntimeError(f"KV cache full: {self.length} + {n} > {self.capacity} positions")
        self._k[:, :, self.length : self.length + n] = key_states
        self._v[:, :, self.length : self.length + n] = value_states
        self.length += n
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._k, self._v = self._k[indices], self._v[indices]
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]


# ------------------------------------------------------------------------------------ scoring
def shared_prompt_row(prompt: torch.Tensor, completions: list[torch.Tensor], attn_implementation: str = "sdpa"):
    """One row ``prompt, c_1, …, c_k``: (input_ids [1, L], position_ids [1, L], 4-D attention mask, and the
    row index predicting each completion token, in completion order)."""
    p = len(prompt)
    total = p + sum(len(c) for c in completions)
    device = prompt.device
    allowed = torch.zeros((total, total), dtype=torch.bool, device=device)
    allowed[:p, :p] = torch.ones((p, p), dtype=torch.bool, device=device).tril()
    positions, predictors, start = [torch.arange(p, device=device)], [], p
    for c in completions:
        n = len(c)
        allowed[start : start + n, :p] = True
        allowed[start : start + n, start : start + n] = torch.ones((n, n), dtype=torch.bool, device=device).tril()
        positions.append(torch.arange(p, p + n, device=device))
        predictors.append(torch.cat([torch.tensor([p - 1], device=device), torch.arange(start, start + n - 1, device=device)]))
        start += n
    if attn_implementation == "eager":  # eager attention adds the mask to the scores
        mask = torch.zeros((total, total), device=device).masked_fill(~allowed, torch.finfo(torch.float32).min)
    else:
        mask = allowed
    ids = torch.cat([prompt, *completions])[None]
    return ids, torch.cat(positions)[None], mask[None, None], torch.cat(predictors)


def shared_prompt_logps(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int,
    temperature: float = 1.0, compute_entropy: bool = False, autocast=None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (and entropies, no grad) of the completion tokens of TRL's padded batch
    (``[B, P + T]``, prompts left-padded, completions right-padded, the last ``logits_to_keep`` = T columns
    the completions), computed one shared-prompt row per distinct prompt; returned as ``[B, T]``."""
    import contextlib

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone, head = getattr(inner, inner.base_model_prefix), inner.get_output_embeddings()
    attn = inner.config._attn_implementation
    t = logits_to_keep
    prompts, prompt_mask = input_ids[:, :-t], attention_mask[:, :-t].bool()
    comps, comp_mask = input_ids[:, -t:], attention_mask[:, -t:].bool()
    groups: dict[tuple, list[int]] = {}
    for i in range(input_ids.shape[0]):
        groups.setdefault(tuple(prompts[i][prompt_mask[i]].tolist()), []).append(i)
    logps = [None] * input_ids.shape[0]
    entropies = [None] * input_ids.shape[0]
    for members in groups.values():
        prompt = prompts[members[0]][prompt_mask[members[0]]]
        completions = [comps[i][comp_mask[i]] for i in members]
        ids, pos, mask, predictors = shared_prompt_row(prompt, completions, attn)
        with autocast() if autocast else contextlib.nullcontext():
            hidden = backbone(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False).last_hidden_state[0]
            logits = head(hidden[predictors]).float() / temperature
        # log p = logit - logsumexp(logits): autograd keeps the logits alone, not a second [tokens, vocab] tensor
        token_logps = logits.gather(-1, torch.cat(completions)[:, None]).squeeze(-1) - logits.logsumexp(-1)
        if compute_entropy:
            with torch.no_grad():
                token_entropy = torch.cat([_entropy(chunk) for chunk in logits.detach().split(256)])
        start = 0
        for i, c in zip(members, completions):
            n = len(c)
            logps[i] = F.pad(token_logps[start : start + n], (0, t - n))
            if compute_entropy:
                entropies[i] = F.pad(token_entropy[start : start + n], (0, t - n))
            start += n
    return torch.stack(logps), (torch.stack(entropies) if compute_entropy else None)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


# ------------------------------------------------------------------------------------ trainer
class SharedPromptGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose generation and log-prob passes share each prompt across its G completions
    (``shared_prompt=False``: TRL's own paths, e.g. for a benchmark baseline)."""

    def __init__(self, *args, shared_prompt: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.shared_prompt = shared_prompt

    def _get_train_sampler(self, dataset=None):
        # TRL's RepeatSampler seeds its generator once and continues it: a run resumed in epoch e drew epoch 0's order
        sampler = super()._get_train_sampler(dataset)
        if getattr(sampler, "shuffle", False) and isinstance(getattr(sampler, "generator", None), torch.Generator):
            sampler = epoch_seeded(sampler, sampler.seed if sampler.seed is not None else self.args.seed)
        return sampler

    def _tokenize_prompts(self, prompts: list):
        # a plain-text prompt's text stays text (TRL calls the tokenizer on it as it is: a "</s>" an attacker logged as
        # a user name was the end-of-text token inside the prompt; an audit, session 43); chat prompts stay TRL's
        from trl.data_utils import is_conversational

        if is_conversational({"prompt": prompts[0]}):
            return super()._tokenize_prompts(prompts)
        from sectune.inference import prompt_ids

        return prompt_ids(self.processing_class, prompts), None, {}

    def _shared_generation_ok(self, images, multimodal_fields) -> bool:
        g = self.generation_config if not self.use_vllm else None
        # CPU only: on one H200 (SmolLM-135M's shape, LoRA r4, 1 prompt x G=8, 128 tokens) this token-by-token
        # loop took 11.7 s per step against 5.9 s for TRL's whole step with transformers' generate, while on a
        # CPU it samples 1.6x faster than generate; on a GPU the shared-row scoring stays, the sampling is TRL's
        return (
            self.shared_prompt and self.accelerator.device.type == "cpu" and not self.use_vllm
            and not self.use_transformers_continuous_batching
            and images is None and not multimodal_fields and not self.tools and g is not None
            and g.min_p is None and not self.args.generation_kwargs
            and self.args.cache_implementation is None
        )

    def _shared_scoring_ok(self, model, compute_aux_loss: bool, extra: dict) -> bool:
        inner = self.accelerator.unwrap_model(model)
        inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
        text = inner.config.get_text_config()
        return (
            self.shared_prompt and self.accelerator.num_processes == 1 and not compute_aux_loss
            and not self._entropy_bonus_enabled and not self.args.cast_lm_head_to_fp32
            and all(v is None for v in extra.values())
            and inner.config._attn_implementation in MASKABLE_ATTENTION
            and getattr(text, "final_logit_softcapping", None) is None
            and all(getattr(text, k, None) is None for k in ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"))
        )

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if not self._shared_generation_ok(images, multimodal_fields):
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        from trl.extras.profiling import profiling_context
        from trl.models import unwrap_model_for_generation

        with (
            profiling_context(self, "sectune.sample_shared_prompt"),
            unwrap_model_for_generation(
                self.model_wrapped, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as wrapped,
            merged_lora(wrapped) as model,
        ):
            g = self.generation_config
            completions = sample_shared_prompt(
                model, prompt_ids, max_new_tokens=self.max_completion_length, eos_token_ids=self.eos_token_ids,
                pad_token_id=self._tokenizer.pad_token_id, temperature=g.temperature, top_k=g.top_k or 0, top_p=g.top_p,
                repetition_penalty=g.repetition_penalty or 1.0,
            )
        return completions, None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **extra):
        if not self._shared_scoring_ok(model, compute_aux_loss, extra):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss, **extra
            )
        logps, entropies = shared_prompt_logps(
            self.accelerator.unwrap_model(model), input_ids, attention_mask, logits_to_keep,
            temperature=self.temperature, compute_entropy=compute_entropy, autocast=self.accelerator.autocast,
        )
        return logps, entropies, None
