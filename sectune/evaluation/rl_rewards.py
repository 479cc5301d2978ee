"""The GRPO stage's rewards as TRL reward functions: each rule of :mod:`sectune.data.auth_rewards` over
the completions and the dataset's ``window``/``annotation`` columns, the reward model of a
``stage=reward`` run, their weights from ``rl.rewards``, and the greedy held-out reward the stage
reports before and after training."""

from __future__ import annotations

import functools
import json

from sectune.data import auth_rewards
from sectune.errors import ConfigError


@functools.lru_cache(maxsize=4096)
def _annotation(text: str) -> dict:
    return json.loads(text)


def rule_reward(name: str):
    """``auth_rewards.REWARDS[name]`` as a TRL reward function of the completions and the dataset's
    ``window`` and ``annotation`` columns (TRL passes extra columns as keyword lists)."""
    fn = auth_rewards.REWARDS[name]

    def reward(prompts, completions, window, annotation, **_):
        return [fn(w, _annotation(a), c) for w, a, c in zip(window, annotation, completions)]

    reward.__name__ = name
    return reward


def model_reward(scorer, normalize: bool = True):
    """The reward model's score as a TRL reward function: ``unit_score`` (standardised by the reward stage's
    validation statistics, squashed into (0, 1) like the rule rewards) or, ``normalize=False``, the raw score."""
    score = scorer.unit_score if normalize else scorer.score

    def reward_model(prompts, completions, **_):
        return score(prompts, completions)

    return reward_model


def reward_functions(cfg, policy=None, policy_base: str | None = None) -> tuple[list, list[float], str | None]:
    """(TRL reward functions, their weights, the reward model's kind). Every rule reward is scored and logged,
    weighted or not (weight 0 when ``rl.rewards`` leaves it out); the reward model only when weighted. With the GRPO
    ``policy`` and the weights its adapter sits on, a LoRA reward model trained on those weights scores on the
    policy's own model (``reward_model.share_with_policy``) rather than a second copy of them."""
    from omegaconf import OmegaConf

    given = OmegaConf.to_container(cfg.rl.rewards, resolve=True) if cfg.rl.rewards is not None else {}
    try:
        weights = auth_rewards.check_reward_weights(given)
    except ValueError as e:
        raise ConfigError(f"rl.rewards: {e}") from None
    if not any(weights.values()):
        raise ConfigError("rl.rewards: every weight is 0; weight at least one reward")
    funcs = [rule_reward(n) for n in auth_rewards.REWARDS]
    w = [weights.get(n, 0.0) for n in auth_rewards.REWARDS]
    kind = None
    if weights.get("reward_model", 0.0):
        if not cfg.rl.reward_model:
            raise ConfigError("rl.rewards.reward_model is weighted but rl.reward_model is not set (give a stage=reward run dir)")
        from sectune.models.reward_model import load_reward_model

        try:
            scorer = load_reward_model(cfg.rl.reward_model, cfg, policy=policy, policy_base=policy_base)
        except ConfigError as e:  # "<path>: no reward model there" named no setting
            raise ConfigError(f"rl.reward_model={cfg.rl.reward_model}: {e}" if "rl.reward_model" not in str(e) else str(e)) from None
        normalize = bool(cfg.rl.normalize_reward_model)
        if normalize and scorer.kind == "trained" and scorer.norm is None:  # the heuristic's score is in [0, 1] already
            raise ConfigError(f"rl.reward_model={cfg.rl.reward_model}: this reward model has no score statistics (saved by an "
                              "older sectune): rerun its stage=reward, or set rl.normalize_reward_model=false for raw scores")
        kind = scorer.kind
        shared = " (its LoRA adapter on the policy's own base weights: no second copy of them)" if hasattr(scorer, "head") else ""
        print(f"sectune: reward model ({scorer.kind}) from {cfg.rl.reward_model}{shared}")
        warn_if_chance(cfg.rl.reward_model, weights["reward_model"])
        funcs.append(model_reward(scorer, normalize))
        w.append(weights["reward_model"])
    elif cfg.rl.reward_model:
        print(f"sectune: warning: rl.reward_model={cfg.rl.reward_model} is set but rl.rewards.reward_model is 0: not used")
    return funcs, w, kind


def warn_if_chance(path, weight: float, chance: float = 0.55) -> None:
    """A trained reward model that ranked its own held-out pairs at chance (its result.json's ``reward_accuracy``) adds
    noise to every advantage it is weighted into: said, with the figure (on generated logs one ranked them at 0.500
    and GRPO used it without a word)."""
    import json
    from pathlib import Path

    for result in (Path(str(path)) / "result.json", Path(str(path)).parent / "result.json"):
        try:
            acc = json.loads(result.read_text(encoding="utf-8")).get("metrics", {}).get("reward_accuracy")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(acc, (int, float)) and acc <= chance:
            print(f"sectune: warning: the reward model ranked its held-out pairs at {acc:.3f} ({result}), about chance: its "
                  f"term (rl.rewards.reward_model={weight}) adds noise to GRPO's advantages; retrain it or weigh it 0")
        return


def heldout_rewards(cfg, model, tokenizer, records: list[dict], reward_funcs, weights) -> list[float]:
    """The weighted total reward of the policy's greedy analysis of each of ``records`` (validation windows):
    the same windows before and after training, so the change is the policy's, not which windows a
    step drew (the per-step curve's noise). Per window, so that two steps can be compared pair by pair."""
    from omegaconf import OmegaConf

    from sectune.inference import generate
    from sectune.models.reward_model import window_from_prompt

    prompts = [r["prompt"] for r in records]
    greedy = OmegaConf.merge(cfg.generation, {"do_sample": False, "max_new_tokens": int(cfg.rl.max_completion_length)})
    was_training = model.training
    texts = generate(model, tokenizer, prompts, greedy, batch_size=int(cfg.infer.batch_size), max_seq_length=int(cfg.model.max_seq_length))  # LoRA folded in on a CPU
    model.train(was_training)
    cols = {"window": [window_from_prompt(p) for p in prompts], "annotation": [r["completion"] for r in records]}
    per_func = [fn(prompts, texts, **cols) for fn in reward_funcs]
    return [sum(w * (v if v is not None else 0.0) for w, v in zip(weights, vals)) for vals in zip(*per_func)]
