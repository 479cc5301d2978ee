"""How a GRPO run (``stage=rl loss=grpo``) is followed: the per-step history TRL logs (each reward's mean
and std, KL, clip fraction, completion length), the start/end summaries of that curve, the held-out reward
on fixed validation windows with the best step kept (``rl.eval_steps``, ``rl.keep_best``), and the
reward-curve PNG. :mod:`sectune.stages.rl` runs the stage."""

from __future__ import annotations

import math
from pathlib import Path

from transformers import TrainerCallback

from sectune.training import engine


class HeldOutBest(TrainerCallback):
    """A Trainer callback that scores the policy on the held-out validation windows every ``eval_steps``
    steps (and when called) and keeps a copy of the trainable weights of the best score: ``rl.keep_best``
    ends with that adapter, step 0 (the starting policy) included, as ``load_best_model_at_end`` would.

    ``score_fn`` returns the mean score or the per-window scores. With per-window scores and ``margin_se`` > 0,
    a later step replaces the kept one only when its mean beats the kept one's by more than ``margin_se``
    standard errors of the paired per-window differences (``rl.keep_best_se``): a gain of a window or two on
    a few dozen validation windows is mostly which windows happened to flip, not a better policy."""

    def __init__(self, score_fn, eval_steps: int, margin_se: float = 0.0):
        self.score_fn, self.eval_steps, self.margin_se = score_fn, eval_steps, float(margin_se)
        self.scores: dict[int, float] = {}
        self.step, self.score, self._state, self._windows = None, -math.inf, None, None

    def evaluate(self, model, step: int) -> float:
        out = self.score_fn(model)
        windows = [float(x) for x in out] if isinstance(out, (list, tuple)) else None
        score = self.scores[step] = sum(windows) / len(windows) if windows else float(out)
        from sectune.tracking import log_step

        log_step({"eval/reward_heldout": score}, step)  # the curve rl.keep_best chooses on, beside TRL's training reward
        if score > self.score + self.margin(windows):
            self.step, self.score, self._windows = step, score, windows
            self._state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return score

    def margin(self, windows: list[float] | None) -> float:
        """``margin_se`` standard errors of the mean paired difference between ``windows`` and the kept
        step's per-window scores (0 without per-window scores on both sides)."""
        if not self.margin_se or not windows or not self._windows or len(windows) != len(self._windows) or len(windows) < 2:
            return 0.0
        diff = [a - b for a, b in zip(windows, self._windows)]
        mean = sum(diff) / len(diff)
        var = sum((d - mean) ** 2 for d in diff) / (len(diff) - 1)
        return self.margin_se * math.sqrt(var / len(diff))

    def restore(self, model) -> None:
        import torch

        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in self._state:
                    p.copy_(self._state[n])

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.eval_steps > 0 and state.global_step % self.eval_steps == 0 and model is not None:
            self.evaluate(model, state.global_step)

    # A checkpoint carries the scores so far and the kept weights, so that train.resume keeps the same best step
    # as the uninterrupted run (step 0's score included) instead of comparing only the evaluations after it.
    STATE_FILE, WEIGHTS_FILE = "heldout_best.json", "heldout_best.safetensors"

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            self.save(folder)

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        from sectune.runner import write_json_atomic

        if self._state is not None:
            save_file({n: t.detach().cpu().contiguous() for n, t in self._state.items()}, str(folder / self.WEIGHTS_FILE))
        write_json_atomic(folder / self.STATE_FILE, {"scores": {str(k): v for k, v in self.scores.items()}, "step": self.step,
                                                     "score": self.score if self.step is not None else None, "windows": self._windows})

    def load(self, folder: Path) -> bool:
        """The scores and kept weights saved with checkpoint ``folder`` (written after the weights: the json marks the
        save complete); False when it holds none."""
        import json

        from safetensors.torch import load_file

        path = Path(folder) / self.STATE_FILE
        if not path.is_file():
            return False
        saved = json.loads(path.read_text(encoding="utf-8"))
        self.scores = {int(k): float(v) for k, v in saved["scores"].items()}
        self.step, self._windows = saved["step"], saved["windows"]
        self.score = float(saved["score"]) if saved["step"] is not None else -math.inf
        weights = Path(folder) / self.WEIGHTS_FILE
        self._state = load_file(str(weights)) if self.step is not None and weights.is_file() else None
        if self.step is not None and self._state is None:
            raise FileNotFoundError(f"{weights}: the kept step {self.step}'s weights are missing")
        return True


# ---------------------------------------------------------------------------------------- history
STEP_KEYS = {"reward": "reward", "reward_std": "reward_std", "kl": "kl", "clip_fraction": "clip_ratio/region_mean",
             "completion_length": "completions/mean_length", "loss": "loss", "entropy": "entropy"}


def rl_history(trainer) -> dict:
    """Trainer's loss history plus one record per logged step: total reward (mean, std), each reward's mean
    and std, KL, clip fraction, completion length. With ``rl.num_iterations`` μ > 1 the rewards are logged on
    the steps that generate, KL and clip fraction on every step."""
    steps = []
    for rec in trainer.state.log_history:
        if "step" not in rec or not ("reward" in rec or "loss" in rec):
            continue
        row = {"step": rec["step"], **{k: rec[v] for k, v in STEP_KEYS.items() if rec.get(v) is not None}}
        row.update({k.removeprefix("rewards/").replace("/", "_"): v for k, v in rec.items() if k.startswith("rewards/") and v is not None})
        steps.append(row)
    return {**engine.loss_history(trainer), "steps": steps}


def curve_metrics(steps: list[dict]) -> dict:
    """``reward_mean_start`` / ``reward_mean_end``: the mean total reward over the first / last quarter of
    the logged steps (at least one step each: a single step's reward is mostly which windows it drew);
    the same for each reward (``reward_verdict_start``, …, ``reward_model_start``); ``kl_mean``,
    ``clip_fraction_mean``, ``completion_length_mean`` over all steps."""
    rewarded = [r for r in steps if r.get("reward") is not None]  # μ > 1: only the steps that generate
    if not rewarded:
        return {}
    k = max(1, len(rewarded) // 4)

    def mean(key, rows):
        vals = [r[key] for r in rows if r.get(key) is not None and math.isfinite(r[key])]
        return sum(vals) / len(vals) if vals else None

    out = {"reward_mean_start": mean("reward", rewarded[:k]), "reward_mean_end": mean("reward", rewarded[-k:])}
    for name in [key.removesuffix("_mean") for key in rewarded[0] if key.endswith("_mean")]:
        prefix = name if name.startswith("reward") else f"reward_{name}"  # reward_verdict_start, reward_model_start
        out[f"{prefix}_start"] = mean(f"{name}_mean", rewarded[:k])
        out[f"{prefix}_end"] = mean(f"{name}_mean", rewarded[-k:])
    for key in ("kl", "clip_fraction", "completion_length"):
        out[f"{key}_mean"] = mean(key, steps)
    return {k: v for k, v in out.items() if v is not None}


def plot_reward_curve(path: Path, steps: list[dict], title: str, weights: dict | None = None, heldout: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax, ax_kl) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, height_ratios=[3, 1])
    rewarded = [r for r in steps if r.get("reward") is not None]
    if rewarded:
        x = [r["step"] for r in rewarded]
        mean = [r["reward"] for r in rewarded]
        std = [r.get("reward_std", 0.0) for r in rewarded]
        ax.plot(x, mean, "k-", lw=2, label="total reward (weighted sum) ± std")
        ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color="k", alpha=0.1)
        for name in [k.removesuffix("_mean") for k in rewarded[0] if k.endswith("_mean")]:
            w = (weights or {}).get(name)
            ax.plot(x, [r.get(f"{name}_mean", float("nan")) for r in rewarded], lw=1, label=name if w is None else f"{name} (weight {w:g})")
    if heldout:  # {step: greedy reward on the same validation windows}: the policy's change, not the draw's
        ax.plot(list(heldout), list(heldout.values()), "bo--", lw=1.5, label="held-out reward (greedy, same validation windows)")
    if steps:
        ax_kl.plot([r["step"] for r in steps], [r.get("kl", float("nan")) for r in steps], "r-", lw=1, label="KL to the reference")
        ax_kl.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_ylabel("mean reward per step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the curves: inside, it covered the early steps
    ax_kl.set_xlabel("step")
    ax_kl.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
