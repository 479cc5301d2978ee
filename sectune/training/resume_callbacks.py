"""Callbacks ``engine.train`` adds to a resumed run: what Trainer restores from a checkpoint that no longer fits the run
resumed (its learning rate under a changed length, its best checkpoint's path where the run was)."""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback


class ResumedLearningRate(TrainerCallback):
    """A resume may change how long a run trains (``train.max_steps``/``epochs``, :data:`checkpoints.RESUMABLE`), but the
    optimizer's saved learning rate is the old schedule's at the step resumed: 0 at the old end of a linear decay, which
    the first resumed step then trained with (an audit, session 36: step 3 of a 2 → 3 resume changed no weight). Each
    group's rate is set from the schedule these settings build, at that step: the saved value when the length is unchanged."""

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):
        sched = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's wrapper
        lambdas, bases = getattr(sched, "lr_lambdas", None), getattr(sched, "base_lrs", None)
        if optimizer is None or not lambdas or not bases or len(lambdas) != len(optimizer.param_groups):
            return
        rates = [base * f(sched.last_epoch) for base, f in zip(bases, lambdas)]
        saved = [g["lr"] for g in optimizer.param_groups]
        if rates == saved:
            return
        for group, rate in zip(optimizer.param_groups, rates):
            group["lr"] = rate
        sched._last_lr = list(rates)
        print(f"sectune: train.resume: this run's length differs from the checkpoint's; the learning rate follows its "
              f"schedule from step {state.global_step} ({rates[0]:.3g}; the checkpoint's schedule had {saved[0]:.3g})")


class ResumedBestCheckpoint(TrainerCallback):
    """The best checkpoint a resumed state names is a path where the run was: Trainer drops it when that folder is gone
    (a moved run) and keeps it when it still exists (a copied run: the other run's weights), and re-points it only at its
    next save. A run resumed at its last step saves nothing, so it ended on its last weights without its best checkpoint,
    or loaded another run's (an audit, session 36). Re-pointed here to this run's own checkpoint of the best step."""

    def on_train_begin(self, args, state, control, **kw):
        step = getattr(state, "best_global_step", None)
        here = Path(args.output_dir) / f"checkpoint-{step}"
        if step and here.is_dir():
            state.best_model_checkpoint = str(here)
