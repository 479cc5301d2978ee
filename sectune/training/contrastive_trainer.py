"""The causal-contrastive step (seed 002) as a transformers ``Trainer`` subclass: inputs, representations, metrics.

A triplet is the benign prompt + its expected answer, the counterfactual prompt and the injected prompt.
Per step the objective (:func:`sectune.losses.causal_contrastive_loss`) needs three pooled
representations and the cross-entropy of the benign answer, and nothing else, so only that is computed:

* the decoder body runs, never the ``…ForCausalLM`` forward: the LM head runs once, on the benign answer
  positions only (seed 002 computed logits at every position of all three inputs);
* the representation is the hidden state after decoder layer ``contrastive.layer`` (-1: the last layer's,
  final-normed, what the LM head reads), mean-pooled over the prompt tokens or the last prompt token. The
  benign prompt's positions see only the prompt (causal attention), so r_b is the representation of the
  input alone, comparable with r_cf and r_inj;
* ``contrastive.forward=separate`` (the default: as fast as batched on this project's CPU, less memory):
  three forwards, the counterfactual and injected ones stopping after the chosen layer when it is not the
  last (a hook ends the forward there); ``batched``: one forward of the three inputs padded into one batch (every row runs every layer).
  Same representations either way (tests/test_contrastive.py); bench/contrastive_throughput.py measures both.
* the injected prompt is the benign one with an instruction planted in one log line, so the two share a
  token prefix (about half the injected prompt on the real windows). With ``share_prefix`` (the default,
  ``contrastive.share_prefix``) the separate injected forward runs only from the batch's shortest shared
  prefix on, attending to the benign forward's keys/values there (its KV cache, gradients flowing through
  it); its hidden states on the prefix are the benign ones (causal attention: the same tokens give the same
  states). Exact, not an approximation (tests/test_contrastive.py); off under activation checkpointing in
  training (full or ``train.selective_checkpointing``: transformers keeps no KV cache there), and for the
  batched forward.

Trainer owns the loop, accumulation, precision, checkpoints (adapter, tokenizer, optimizer, scheduler,
RNG) and W&B; this module adds the loss, the train/eval metrics, memory figures in the logs, and a stop
with advice on a NaN/inf loss. The decoder is called below the top-level module, so (as the reward
stage) this runs on one process: the stage refuses torchrun.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import AutocastKwargs
from transformers import Trainer

from sectune.errors import SectuneError
from sectune.losses import causal_contrastive_loss
from sectune.training import checkpoints, engine

FORWARDS = ("separate", "batched")
POOLINGS = ("mean", "last")
GROUPS = ("b", "cf", "inj")
#: seed 002's "Issue: Loss is NaN" list, said when a non-finite loss stops the run
NAN_ADVICE_ALWAYS = (
    "reduce the learning rate (train.learning_rate, e.g. 2e-4 → 1e-4); raise the warmup (train.warmup_ratio, "
    "0.03 → 0.1); check the temperature (loss.temperature, not too small); clip gradients (train.max_grad_norm=1.0)"
)


def nan_advice(debug_on: bool) -> str:
    """Seed 002's list; anomaly detection only where it is not on already."""
    return NAN_ADVICE_ALWAYS + ("" if debug_on else "; turn on anomaly detection (debug.enabled=true)")


class NonFiniteLossError(SectuneError):
    """A NaN or inf loss: the step, the last good checkpoint and what to try."""


# ------------------------------------------------------------------------------------------ inputs
def encode_triplets(tokenizer, triplets: list[dict], max_len: int) -> tuple[list[dict], int]:
    """Token ids per triplet: benign prompt + answer + EOS (answer cut at ``max_len``), cf and injected prompts.
    ``triplets`` hold rendered ``prompt``, ``cf_prompt``, ``injection_prompt`` and ``output``. Returns the rows
    and how many were cut. A prompt too long is cut in the middle (``inference.cut_middle``, as generation cuts it):
    cut from the right, an injection appended after a long prompt (the generic builder's) and the answer cue after it
    were cut away, leaving an "injected" input equal to the clean one."""
    from sectune.inference import completion_ids, cut_middle, prompt_ids

    rows, cut = [], 0
    for t in triplets:
        # text as text: an injection's "</s>" or "<|eot_id|>" is characters, the answer's EOS the token (an audit, session 43)
        prompt = prompt_ids(tokenizer, t["prompt"])
        # the answer's tokens after its prompt, as SFT trains and generation writes them (tokenized alone, Llama-2's
        # SentencePiece began it with a "▁" neither produces; an audit, session 42)
        answer = completion_ids(tokenizer, t["prompt"], t["output"], prompt) + [tokenizer.eos_token_id]
        cf, inj = (prompt_ids(tokenizer, t[k]) for k in ("cf_prompt", "injection_prompt"))
        if max(len(prompt) + len(answer), len(cf), len(inj)) > max_len:
            cut += 1
        prompt, cf, inj = cut_middle(prompt, max_len - 1), cut_middle(cf, max_len), cut_middle(inj, max_len)  # >= 1 answer token
        rows.append({"b_ids": (prompt + answer)[:max_len], "b_prompt_len": len(prompt), "cf_ids": cf, "inj_ids": inj,
                     "inj_shared": shared_prefix(prompt, inj)})
    return rows, cut


def shared_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class TripletCollator:
    """Right-padded ``{g}_input_ids`` / ``{g}_attention_mask`` for g in b, cf, inj, the benign prompt lengths,
    ``b_labels`` (-100 on the prompt and padding: the task loss reads the answer tokens only) and
    ``inj_shared`` (the injected prompt's leading tokens equal to the benign prompt's, per row)."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, rows: list[dict]) -> dict:
        out = {}
        for g in GROUPS:
            seqs = [r[f"{g}_ids"] for r in rows]
            width = max(map(len, seqs))
            out[f"{g}_input_ids"] = torch.tensor([s + [self.pad] * (width - len(s)) for s in seqs])
            out[f"{g}_attention_mask"] = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        prompt_lens = torch.tensor([r["b_prompt_len"] for r in rows])
        labels = out["b_input_ids"].clone()
        positions = torch.arange(labels.shape[1])
        labels[(positions[None] < prompt_lens[:, None]) | (out["b_attention_mask"] == 0)] = -100
        shared = [r["inj_shared"] if "inj_shared" in r else shared_prefix(r["b_ids"][: r["b_prompt_len"]], r["inj_ids"]) for r in rows]
        out.update(b_prompt_lens=prompt_lens, b_labels=labels, inj_shared=torch.tensor(shared))
        return out


# --------------------------------------------------------------------------------- representations
class _StopForward(Exception):
    pass


def causal_lm_parts(model):
    """(decoder body, its layer list, LM head) of a ``…ForCausalLM``, PEFT-wrapped or not (LoRA layers sit
    inside the modules, so calling them directly trains the adapter)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = inner.get_decoder()
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None)
    if layers is None:
        raise SectuneError(f"stage=contrastive: cannot find the decoder layers of {type(inner).__name__}")
    return decoder, layers, inner.get_output_embeddings()


def resolve_layer(layer: int, num_layers: int) -> int:
    """``contrastive.layer`` as 1..L: k = the output of the k-th decoder layer; -1 (or L) the last, final-normed."""
    k = num_layers if layer == -1 else int(layer)
    if not 1 <= k <= num_layers:
        raise SectuneError(f"contrastive.layer={layer}: choose 1..{num_layers} (a decoder layer) or -1 (the last)")
    return k


def _cache_kwarg(decoder) -> str:
    """The decoder's KV-cache argument/output name: ``cache`` (transformers 5) or ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def decoder_hidden(decoder, layers, ids, mask, k: int, stop: bool, cache=None, keep_cache: bool = False):
    """(final hidden states or None, hidden states after layer k[, the KV cache]). ``stop``: end the forward after
    layer k. ``cache``: keys/values of earlier positions (``ids`` continue them); ``keep_cache``: also return this
    forward's cache (None where the decoder keeps none: gradient checkpointing in training)."""
    name = _cache_kwarg(decoder) if cache is not None or keep_cache else None
    kwargs = {"use_cache": False} if name is None else {"use_cache": True, name: cache}
    seen = {}

    def grab(module, args, output):
        seen["h"] = output[0] if isinstance(output, tuple) else output
        if stop:
            raise _StopForward

    handle = layers[k - 1].register_forward_hook(grab) if k < len(layers) else None
    out = None
    try:
        out = decoder(input_ids=ids, attention_mask=mask, **kwargs)
    except _StopForward:
        pass
    finally:  # removed before backward, so a checkpointed layer's recompute never meets it
        if handle is not None:
            handle.remove()
    last = out.last_hidden_state if out is not None else None
    h = last if k == len(layers) else seen["h"]
    if keep_cache:
        return last, h, (getattr(out, name, None) if out is not None else None)
    return last, h


def prefix_cache(cache, length: int, config):
    """A new KV cache holding the first ``length`` positions of ``cache`` (slices: gradients reach the original
    keys/values), or None when ``cache`` is not a per-layer key/value cache this can slice."""
    from transformers import DynamicCache

    layers = getattr(cache, "layers", None)
    if not layers or any(getattr(lay, "keys", None) is None or getattr(lay, "is_sliding", False) for lay in layers):
        return None
    out = DynamicCache(config=config)
    for i, lay in enumerate(layers):
        out.update(lay.keys[..., :length, :], lay.values[..., :length, :], i)
    return out


def pool(hidden: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """Per row, the mean of the first ``lengths`` positions (the prompt) or the last of them."""
    if pooling == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
    m = (torch.arange(hidden.shape[1], device=hidden.device)[None] < lengths[:, None]).to(hidden.dtype)
    return (hidden * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True)


def _pad_to(t: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return F.pad(t, (0, width - t.shape[1]), value=value)


def triplet_forward(model, batch: dict, layer: int = -1, pooling: str = "mean", forward: str = "separate", share_prefix: bool = True):
    """(r_b, r_cf, r_inj, task loss) of a :class:`TripletCollator` batch; the LM head runs once, on the benign
    answer positions. ``share_prefix`` (separate forward): the injected forward starts after the prefix it shares
    with the benign prompt, on the benign forward's KV cache (the module doc)."""
    if forward not in FORWARDS or pooling not in POOLINGS:
        raise SectuneError(f"contrastive.forward={forward!r} / contrastive.pooling={pooling!r}: choose {FORWARDS} / {POOLINGS}")
    decoder, layers, head = causal_lm_parts(model)
    k = resolve_layer(layer, len(layers))
    lens = {"b": batch["b_prompt_lens"], "cf": batch["cf_attention_mask"].sum(1), "inj": batch["inj_attention_mask"].sum(1)}
    if forward == "batched":
        width = max(batch[f"{g}_input_ids"].shape[1] for g in GROUPS)
        ids = torch.cat([_pad_to(batch[f"{g}_input_ids"], width, 0) for g in GROUPS])
        mask = torch.cat([_pad_to(batch[f"{g}_attention_mask"], width, 0) for g in GROUPS])
        last, h = decoder_hidden(decoder, layers, ids, mask, k, stop=False)
        r = pool(h, torch.cat([lens[g] for g in GROUPS]), pooling)
        n = batch["b_input_ids"].shape[0]
        r_b, r_cf, r_inj = r[:n], r[n : 2 * n], r[2 * n :]
        last_b = last[:n, : batch["b_input_ids"].shape[1]]
    else:
        # the prefix every row's injected prompt shares with its benign prompt (never past the shortest row); none under
        # activation checkpointing in training (transformers drops the KV cache there: a recompute would append twice)
        checkpointed = layers[0].training and torch.is_grad_enabled() and getattr(layers[0], "gradient_checkpointing", False)
        shared = int(batch["inj_shared"].min()) if share_prefix and "inj_shared" in batch and not checkpointed else 0
        out_b = decoder_hidden(decoder, layers, batch["b_input_ids"], batch["b_attention_mask"], k, stop=False, keep_cache=shared > 0)
        last_b, h_b, cache = out_b if shared > 0 else (*out_b, None)
        r_b = pool(h_b, lens["b"], pooling)
        r_cf = pool(decoder_hidden(decoder, layers, batch["cf_input_ids"], batch["cf_attention_mask"], k, stop=True)[1], lens["cf"], pooling)
        inj_ids, inj_mask = batch["inj_input_ids"], batch["inj_attention_mask"]
        past = prefix_cache(cache, shared, decoder.config) if cache is not None and shared < inj_ids.shape[1] else None
        if cache is not None and shared >= inj_ids.shape[1]:  # every injected prompt lies inside its benign prompt
            h_inj = h_b[:, : inj_ids.shape[1]]
        elif past is not None:
            h_inj = torch.cat([h_b[:, :shared], decoder_hidden(decoder, layers, inj_ids[:, shared:], inj_mask, k, stop=True, cache=past)[1]], 1)
        else:
            h_inj = decoder_hidden(decoder, layers, inj_ids, inj_mask, k, stop=True)[1]
        r_inj = pool(h_inj, lens["inj"], pooling)
    # position t predicts token t+1: the head reads only the positions whose next token is an answer token
    targets = batch["b_labels"][:, 1:]
    keep = targets != -100
    logits = head(last_b[:, :-1][keep])
    task = F.cross_entropy(logits.float(), targets[keep]) if keep.any() else logits.sum() * 0.0
    return r_b, r_cf, r_inj, task


def similarity_rows(r_b, r_cf, r_inj) -> torch.Tensor:
    """``[N, 2]``: cos(b, cf) and cos(b, inj) per triplet: what the metrics below are means of."""
    return torch.stack([F.cosine_similarity(r_b.float(), r_cf.float(), dim=-1),
                        F.cosine_similarity(r_b.float(), r_inj.float(), dim=-1)], dim=-1)


def summarize(cos_rows: torch.Tensor, task_losses: list[float]) -> dict:
    """causal_stability, spurious_separation, causal_discrimination (sectune.losses' definitions, over all rows)
    and the mean task loss."""
    stability, to_inj = cos_rows[:, 0].mean().item(), cos_rows[:, 1].mean().item()
    out = {"causal_stability": stability, "spurious_separation": 1 - to_inj, "causal_discrimination": stability - to_inj}
    if task_losses:
        out["task_loss"] = sum(task_losses) / len(task_losses)
    return out


@torch.no_grad()
def representation_metrics(model, rows: list[dict], collator, batch_size: int, **fwd) -> dict:
    """The metrics on ``rows`` with the model as it is now (held-out triplets before and after training)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    cos, tasks = [], []
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collator(rows[i : i + batch_size]).items()}
        r_b, r_cf, r_inj, task = triplet_forward(model, batch, **fwd)
        cos.append(similarity_rows(r_b, r_cf, r_inj).cpu())
        tasks.append(task.item())
    model.train(was_training)
    return summarize(torch.cat(cos), tasks) if cos else {}


def memory_logs() -> dict:
    """Peak allocated GPU memory (CUDA) or this process's peak RSS (CPU), in MiB, for the step logs."""
    if torch.cuda.is_available():
        return {"peak_cuda_allocated_mib": torch.cuda.max_memory_allocated() / 2**20}
    return {"peak_rss_mib": engine.peak_rss_bytes() / 2**20}


# ----------------------------------------------------------------------------------------- trainer
def through_prepared(model, fn, autocast):
    """``fn(module)`` called as the Trainer's prepared model is called. :func:`triplet_forward` runs the decoder's layers
    itself (to stop at ``contrastive.layer`` and share a KV cache), below the model's ``forward``, where accelerate
    attaches its mixed-precision autocast and DistributedDataParallel its gradient all-reduce: so ``fn`` runs under
    ``autocast`` (``accelerator.autocast()``), and under DDP inside one call of the wrapper, whose wrapped module's
    ``forward`` is ``fn`` for that call. (Called below both, a bf16 run trained in fp32 and each rank kept its own
    gradients.)"""
    from torch.nn.parallel import DistributedDataParallel

    with autocast:
        if not isinstance(model, DistributedDataParallel):
            return fn(model)
        inner = model.module
        saved = inner.__dict__.get("forward")  # accelerate's autocast wrapper, if it installed one
        inner.forward = lambda: fn(inner)
        try:
            return model()
        finally:
            if saved is None:
                del inner.forward
            else:
                inner.forward = saved


class CausalContrastiveTrainer(Trainer):
    """Trainer whose loss is :func:`causal_contrastive_loss` of :func:`triplet_forward`'s outputs.

    Logs, beside Trainer's loss / grad norm / learning rate: the loss parts, causal_stability,
    spurious_separation, causal_discrimination and task_loss (train: means over the logging interval;
    eval: over the eval set, as ``eval_*``), and peak memory."""

    def __init__(self, *args, loss_weights: dict, layer: int = -1, pooling: str = "mean", forward: str = "separate",
                 share_prefix: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_weights = dict(loss_weights)
        self.fwd = {"layer": int(layer), "pooling": pooling, "forward": forward, "share_prefix": bool(share_prefix)}
        self._train_cos: list[torch.Tensor] = []
        self._train_parts: dict[str, list[float]] = defaultdict(list)
        self._eval_cos: list[torch.Tensor] = []
        self._eval_task: list[float] = []

    # The loss of an optimizer step is the objective over every triplet of the step (all train.grad_accum micro-batches):
    # the cosine terms a mean over its triplets, the task term a mean over its benign answer tokens. compute_loss divides
    # by the step's counts itself (transformers >= 5.19 then leaves the loss as it is): a per-micro-batch mean / grad_accum
    # weighted an answer token by 1/(answer tokens of its micro-batch), so batch_size=4 grad_accum=1 and batch_size=2
    # grad_accum=2 trained and logged different things on the same triplets.
    loss_is_scaled_for_ga = True

    def _get_num_items_in_batch(self, batch_samples: list, device) -> torch.Tensor:
        """``[triplets, benign answer tokens]`` of the optimizer step (what triplet_forward's task loss averages over)."""
        n = torch.tensor([sum(int(b["b_input_ids"].shape[0]) for b in batch_samples),
                          sum(int((b["b_labels"][:, 1:] != -100).sum()) for b in batch_samples)], device=device)
        if self.args.world_size > 1:
            n = self.accelerator.gather(n[None]).sum(0)
        return n

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # autocast without its weight-cast cache: the layers run up to three times in one region (benign, counterfactual,
        # injected), and a checkpointed layer's recompute casts afresh, so with the cache the recompute met casts its
        # forward had skipped (selective checkpointing stops on that)
        autocast = self.accelerator.autocast(AutocastKwargs(cache_enabled=False))
        r_b, r_cf, r_inj, task = through_prepared(model, lambda m: triplet_forward(m, inputs, **self.fwd), autocast)
        loss, parts = causal_contrastive_loss(r_b, r_cf, r_inj, task, **self.loss_weights)
        if num_items_in_batch is not None:  # training: this micro-batch's share of the step's objective
            step_rows, step_tokens = torch.as_tensor(num_items_in_batch).to(loss.device).float().clamp(min=1).unbind(-1)
            rows, tokens = r_b.shape[0], (inputs["b_labels"][:, 1:] != -100).sum()
            w = {k: float(self.loss_weights.get(k, 1.0)) for k in ("lambda_causal", "lambda_spurious", "lambda_task")}
            loss = ((w["lambda_causal"] * parts["causal"] + w["lambda_spurious"] * parts["spurious"]) * (rows / step_rows)
                    + w["lambda_task"] * parts["task"] * (tokens / step_tokens)) * self.accelerator.num_processes
        if model.training:
            if not torch.isfinite(loss):
                self._stop_non_finite(loss, parts)
            self._train_cos.append(similarity_rows(r_b, r_cf, r_inj).detach())
            for name, v in parts.items():
                self._train_parts[f"{name}_loss"].append(v.detach())
        return (loss, (r_b, r_cf, r_inj, task)) if return_outputs else loss

    def _stop_non_finite(self, loss, parts) -> None:
        last_good = checkpoints.last_finite_checkpoint(Path(self.args.output_dir))
        values = ", ".join(f"{k} {v.item():.4g}" for k, v in parts.items())
        raise NonFiniteLossError(
            f"stage=contrastive: the loss is {loss.item()} at step {self.state.global_step + 1} ({values}); last good "
            f"checkpoint: {last_good or 'none saved yet'}. What to try (seed 002): {nan_advice(torch.is_anomaly_enabled())}"
        )

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, (r_b, r_cf, r_inj, task) = self.compute_loss(model, inputs, return_outputs=True)
        self._eval_cos.append(self.accelerator.gather_for_metrics(similarity_rows(r_b, r_cf, r_inj)).cpu())
        self._eval_task.extend(self.accelerator.gather(task.detach().float()[None]).tolist())  # every rank's batch
        return loss.detach(), None, None

    def evaluation_loop(self, *args, **kwargs):
        self._eval_cos, self._eval_task = [], []
        out = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        if self._eval_cos:
            out.metrics.update({f"{prefix}_{k}": v for k, v in summarize(torch.cat(self._eval_cos), self._eval_task).items()})
        return out

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs and self._train_cos:  # a training log: the interval's means (every rank logs at the same step:
            # over every rank's triplets; each rank saw the same number of micro-batches of the same size)
            logs.update(summarize(self.accelerator.gather(torch.cat(self._train_cos).float()), []))
            logs.update({k: self.accelerator.gather(torch.stack(v).float()).mean().item() for k, v in self._train_parts.items()})
            self._train_cos, self._train_parts = [], defaultdict(list)
        logs.update(memory_logs())
        super().log(logs, start_time)
