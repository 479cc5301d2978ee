"""Reward models: a trained Bradley-Terry scorer or the heuristic fallback, behind one interface.

* :func:`encode_pair_groups` / :class:`SharedPromptCollator` / :func:`sequence_rewards`: how the
  reward stage scores completions. Pairs are grouped by prompt (an auth window's chosen analysis and
  its ``pairs_per_window`` corruptions); a group is one row holding the prompt once and then every
  completion, each attending to the prompt and to itself only, and the one-output ``score`` head
  reads each completion's last token (its EOS). One forward per batch, prompts encoded once.
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


def encode_group(tokenizer, prompt: str, completions: Sequence[str], max_length: int) -> tuple[dict, int]:
    """One prompt and its completions (each + EOS) as ids. When the prompt and the longest completion
    exceed ``max_length``, the prompt is cut (the completions, which the reward judges, are kept whole).
    Returns (``{"prompt_ids", "completion_ids"}``, prompt tokens cut).

    The prompt is cut in the middle, as infer cuts it (``inference.cut_middle``): cut from its start it lost BOS and the
    instruction, so the reward model trained and scored long windows without them (an audit, session 42). A completion
    is the tokens it adds after the prompt (:func:`completion_ids`), as SFT, DPO and generation see it."""
    from sectune.inference import completion_ids, cut_middle, prompt_ids

    p = prompt_ids(tokenizer, prompt)  # a log line's "</s>" stays text, the appended EOS is the token (an audit, session 43)
    cs = [completion_ids(tokenizer, prompt, c, p)[: max_length - 1] + [tokenizer.eos_token_id] for c in completions]
    over = max(0, len(p) + max(map(len, cs)) - max_length)
    return {"prompt_ids": cut_middle(p, len(p) - over), "completion_ids": cs}, over


def _same_cut(tokenizer, prompt: str, completions: Sequence[str], max_length: int) -> list[list[str]]:
    """``completions`` in groups whose prompt :func:`encode_group` cuts by as many tokens, in order (one group where the
    prompt and every completion fit ``max_length``)."""
    from sectune.inference import completion_ids, prompt_ids

    p = prompt_ids(tokenizer, prompt)
    n = len(p)
    groups: dict[int, list[str]] = {}
    for c in completions:
        length = min(len(completion_ids(tokenizer, prompt, c, p)), max_length - 1) + 1  # + EOS
        groups.setdefault(max(0, n + length - max_length), []).append(c)
    return list(groups.values())


def group_pairs(pairs: Sequence[dict]) -> list[dict]:
    """Pairs sharing a prompt → ``{"prompt", "completions" (unique, in order), "pairs": [(chosen, rejected) indices]}``."""
    groups: dict[str, dict] = {}
    for p in pairs:
        g = groups.setdefault(p["prompt"], {"prompt": p["prompt"], "completions": [], "pairs": []})
        idx = []
        for text in (p["chosen"], p["rejected"]):
            if text not in g["completions"]:
                g["completions"].append(text)
            idx.append(g["completions"].index(text))
        g["pairs"].append(tuple(idx))
    return list(groups.values())


def encode_pair_groups(tokenizer, pairs: Sequence[dict], max_length: int) -> tuple[list[dict], int]:
    """Training rows: one per prompt, with its completions and the (chosen, rejected) index pairs."""
    rows, cut = [], 0
    for g in group_pairs(pairs):
        enc, over = encode_group(tokenizer, g["prompt"], g["completions"], max_length)
        cut += over > 0
        rows.append({**enc, "pairs": [list(ij) for ij in g["pairs"]]})
    return rows, cut


class SharedPromptCollator:
    """Groups → one row each: the prompt once, then every completion, each attending to the prompt
    and to itself only (a 4D mask), positions continuing from the prompt. Every completion is scored
    exactly as if it followed the prompt alone, but the prompt (~600 of ~700 tokens of an auth-log
    pair) is encoded once per group instead of twice per pair. Rows are right-padded to a multiple
    of ``pad_to_multiple_of``; ``seq_ends`` index the flattened ``[B·L]`` positions of each
    completion's last token (its EOS) and ``pairs`` index ``seq_ends``."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 64):
        self.pad, self.multiple = pad_token_id, pad_to_multiple_of

    def __call__(self, groups: list[dict]) -> dict:
        lengths = [len(g["prompt_ids"]) + sum(map(len, g["completion_ids"])) for g in groups]
        L = max(lengths) + (-max(lengths)) % self.multiple
        B = len(groups)
        ids = torch.full((B, L), self.pad, dtype=torch.long)
        pos = torch.zeros((B, L), dtype=torch.long)
        span = torch.full((B, L), -1, dtype=torch.long)  # 0 = prompt, i + 1 = completion i, < 0 = padding
        ends, pairs = [], []
        for b, g in enumerate(groups):
            P = len(g["prompt_ids"])
            ids[b, :P] = torch.tensor(g["prompt_ids"])
            pos[b, :P] = torch.arange(P)
            span[b, :P] = 0
            at, first = P, len(ends)
            for i, c in enumerate(g["completion_ids"]):
                n = len(c)
                ids[b, at : at + n] = torch.tensor(c)
                pos[b, at : at + n] = torch.arange(P, P + n)
                span[b, at : at + n] = i + 1
                at += n
                ends.append(b * L + at - 1)
            pairs.extend([first + i, first + j] for i, j in g.get("pairs", []))
            span[b, at:] = -torch.arange(1, L - at + 1)  # each pad token its own span: it sees itself (and the prompt)
        q, k = span[:, :, None], span[:, None, :]
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        mask = causal & ((k == 0) | (k == q))
        return {"input_ids": ids, "position_ids": pos, "attention_mask": mask[:, None], "seq_ends": torch.tensor(ends),
                "pairs": torch.tensor(pairs, dtype=torch.long).view(-1, 2)}


def seq_cls_model(model):
    """The ``…ForSequenceClassification`` inside PEFT / accelerate wrappers."""
    inner = model.module if hasattr(model, "module") and not hasattr(model, "score") else model
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    if not isinstance(getattr(inner, "score", None), torch.nn.Module):
        raise ConfigError(f"the reward model needs a decoder …ForSequenceClassification with a `score` head; got {type(inner).__name__}")
    return inner


def sequence_rewards(model, batch: dict) -> torch.Tensor:
    """One scalar per completion of a :class:`SharedPromptCollator` batch: the score head's output at
    each completion's last position.

    ``model`` is called as a whole (``model(...)``), so under torchrun / accelerate the call goes through
    the DistributedDataParallel wrapper and the ranks all-reduce their gradients. (It called the decoder
    body and the head of the unwrapped model directly, which DDP never saw: each rank stepped on its own
    gradient and the ranks ended with different reward models.) A forward hook on the ``score`` head keeps
    its per-position output ``[B, L, 1]`` (the head is one output wide, so that costs nothing next to the
    body); transformers' pad-token pooling (one position per row) is left unused.
    """
    inner = seq_cls_model(model)
    seen: dict = {}
    hook = inner.score.register_forward_hook(lambda _module, _args, out: seen.__setitem__("logits", out))
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
              use_cache=False)
    finally:
        hook.remove()
    logits = seen["logits"]
    return logits.reshape(-1, logits.shape[-1])[batch["seq_ends"]].squeeze(-1).float()


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

    unit_score = score  # a weighted sum of checks, already in [0, 1]


class TrainedRewardModel:
    """A ``stage=reward`` adapter + head (or full model), scored in padding-free batches."""

    kind = "trained"

    def __init__(self, model, tokenizer, max_length: int, batch_size: int = 8, norm: tuple[float, float] | None = None):
        self.model, self.tokenizer, self.max_length, self.batch_size = model.eval(), tokenizer, max_length, batch_size
        #: (mean, std) of the reward stage's scores of its validation pairs' completions; None = not recorded
        self.norm = norm

    def unit_score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """``score`` mapped into (0, 1), the rule rewards' range: sigmoid((s - mean) / std) with the reward
        stage's statistics, so a completion scored like an average validation completion gets 0.5. A
        Bradley-Terry score has no scale of its own (only differences are trained), so raw scores would make
        the reward model's ``rl.rewards`` weight mean a different thing for every reward model."""
        if self.norm is None:
            raise ValueError("this reward model has no score statistics (saved by an older sectune): rerun stage=reward, "
                             "or set rl.normalize_reward_model=false to use its raw scores")
        mean, std = self.norm
        return torch.sigmoid((torch.tensor(self.score(prompts, completions), dtype=torch.float64) - mean) / std).tolist()

    @torch.no_grad()
    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """Completions grouped by prompt (each prompt encoded once, each distinct completion of it scored
        once: GRPO's samples repeat, and a window's pairs share their chosen answer), ``batch_size``
        prompts per forward."""
        device = self._device()
        order: dict[str, dict[str, list[int]]] = {}  # prompt → distinct completion → the indices asking for it
        for i, (p, c) in enumerate(zip(prompts, completions)):
            order.setdefault(p, {}).setdefault(c, []).append(i)
        # a completion's prompt is cut by its own length, not its group's longest: a correct answer scored 0.75 alone and
        # 0.31 beside a rambling sibling (an audit, session 41); completions whose cut is the same still share the prompt
        groups = [([by[c] for c in same], encode_group(self.tokenizer, p, same, self.max_length)[0])
                  for p, by in order.items() for same in _same_cut(self.tokenizer, p, list(by), self.max_length)]
        out = [0.0] * len(prompts)
        collate = SharedPromptCollator(self.tokenizer.pad_token_id)
        for b in range(0, len(groups), self.batch_size):
            chunk = groups[b : b + self.batch_size]
            batch = {k: v.to(device) for k, v in collate([g[1] for g in chunk]).items()}
            scores = self._forward(batch).tolist()
            asking = [idx for g in chunk for idx in g[0]]
            for idx, r in zip(asking, scores, strict=True):
                for i in idx:
                    out[i] = r
        return out

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _forward(self, batch: dict) -> torch.Tensor:
        return sequence_rewards(self.model, batch)


#: the name of a reward model's LoRA adapter when it rides on the GRPO policy's model (:class:`SharedBaseRewardModel`)
SHARED_ADAPTER = "sectune_reward"
#: where PEFT saves the SEQ_CLS adapter's score head (``modules_to_save``) in adapter_model.safetensors
SCORE_HEAD_KEY = "base_model.model.score.weight"


def reward_model_dir(path: str | Path) -> Path:
    """A ``stage=reward`` run dir (via its result.json) or the ``reward_model/`` folder itself."""
    from sectune.run_records import run_owning

    p = Path(path)
    if (p / META_FILE).is_file():
        owner = run_owning(p)  # <failed reward run>/reward_model: refused as its run dir is (an audit, session 36)
        res = json.loads(owner.read_text(encoding="utf-8")) if owner is not None else {}
        if owner is not None and isinstance(res, dict) and res.get("stage") == "reward" and res.get("status") != "succeeded":
            raise ConfigError(f"{p}: the stage=reward run it belongs to ({owner.parent}) says status {res.get('status')!r}: "
                              "its scores may be NaN; give a succeeded reward run")
        return p
    result = p / "result.json"
    if result.is_file():
        res = json.loads(result.read_text(encoding="utf-8"))
        if res.get("stage") != "reward" or res.get("status") != "succeeded":
            raise ConfigError(f"{p}: not a succeeded stage=reward run (stage={res.get('stage')}, status={res.get('status')})")
        rel = res.get("artifacts", {}).get("reward_model")
        if rel and (p / rel / META_FILE).is_file():
            return p / rel
    raise ConfigError(f"{p}: no reward model there (expected a stage=reward run dir or a folder with {META_FILE})")


def load_reward_model(path: str | Path, cfg=None, batch_size: int = 8, policy=None, policy_base: str | None = None):
    """The scorer saved by ``stage=reward`` at ``path``; a missing head or adapter is a named error. With the GRPO
    ``policy`` (a LoRA ``PeftModel``) and the weights its adapter sits on (``policy_base``), a LoRA reward model trained
    on those same weights rides on the policy's model (:func:`share_with_policy`) instead of loading them again."""
    d = reward_model_dir(path)
    meta = json.loads((d / META_FILE).read_text(encoding="utf-8"))
    if meta.get("kind") == "heuristic":
        if not (d / HEURISTIC_FILE).is_file():
            raise ConfigError(f"{d}: {HEURISTIC_FILE} missing (the heuristic reward model's spec)")
        return HeuristicRewardModel(json.loads((d / HEURISTIC_FILE).read_text(encoding="utf-8")), where=str(d / HEURISTIC_FILE))
    check_head(d)
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sectune.chat_frame import RECORD_KEY, attach

    tokenizer = AutoTokenizer.from_pretrained(d)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # it scores inside the chat template it trained in, as its tokenizer_config.json records (never the policy's choice)
    attach(tokenizer, bool(tokenizer.init_kwargs.get(RECORD_KEY)), str(d))  # (its record decides: no note either way)
    norm = (float(meta["score_mean"]), float(meta["score_std"])) if "score_mean" in meta and "score_std" in meta else None
    if (d / "adapter_config.json").is_file() and policy is not None:
        from sectune.models.shared_reward import share_with_policy  # (it subclasses TrainedRewardModel, defined here)

        shared = share_with_policy(d, meta, policy, policy_base, cfg, tokenizer, batch_size, norm)
        if shared is not None:
            return shared
    if (d / "adapter_config.json").is_file():
        kwargs = {}
        q = meta.get("quantization", "none")
        if q != "none":  # score on the base the adapter was trained on (nf4/int8): its saved settings, else the caller's
            from omegaconf import OmegaConf

            from sectune.models.modeling import quantization_config

            saved = meta.get("quantization_settings")
            try:
                trained = OmegaConf.merge(cfg, {"quantization": saved}) if isinstance(saved, dict) and cfg is not None else None
            except Exception:  # noqa: BLE001 - settings of another sectune version: the name alone, as before
                trained = None
            if trained is not None:
                kwargs["quantization_config"] = quantization_config(trained)
            elif cfg is not None and cfg.quantization.name == q:
                kwargs["quantization_config"] = quantization_config(cfg)
            else:
                print(f"sectune: warning: {d} was trained on a {q} base; scoring on an unquantized one (compose quantization={q} to match)")
        base_path = str(meta.get("base_model") or "")
        try:  # the folder it names, or the local Hugging Face cache: a reward model's base is not fetched while scoring
            base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1, local_files_only=True, **kwargs)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{d / META_FILE}: base_model {base_path!r} is neither a folder here nor in the local Hugging Face "
                              f"cache ({type(e).__name__}); provide those weights, or retrain the reward model here") from None
        base.config.pad_token_id = tokenizer.pad_token_id
        if "quantization_config" in kwargs:  # score with the kernel the reward stage trained and validated it with
            from sectune.models.modeling import keep_training_4bit_layout

            keep_training_4bit_layout(base)
        model = PeftModel.from_pretrained(base, d)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(d, num_labels=1)
    if cfg is not None:
        from sectune.models.modeling import to_run_device

        model = to_run_device(model, cfg)
    return TrainedRewardModel(model, tokenizer, int(meta["max_length"]), batch_size, norm=norm)


def check_head(d: Path) -> None:
    """The trained score head must be in the saved weights: without it the scores are random."""
    from safetensors import safe_open

    files = [d / "adapter_model.safetensors"] if (d / "adapter_config.json").is_file() else sorted(d.glob("model*.safetensors"))
    files = [f for f in files if f.is_file()]
    if not files:
        raise ConfigError(f"{d}: reward model weights missing (adapter_model.safetensors or model.safetensors)")
    from sectune.training.checkpoints import damaged_safetensors

    if (damage := damaged_safetensors(d)) is not None:  # a cut-short copy: SafetensorError and a traceback otherwise
        raise ConfigError(f"{d / damage[0]} is damaged ({damage[1]}); retrain the reward model or copy it again")
    for f in files:
        with safe_open(str(f), "pt") as st:
            if any(".score." in f".{k}" or k.startswith("score.") for k in st.keys()):
                return
    raise ConfigError(f"{d}: the reward model's score head is not in {files[0].name}; the run that wrote it did not save the head")
