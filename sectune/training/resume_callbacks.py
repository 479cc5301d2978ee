"""Callbacks ``engine.train`` adds to a resumed run: what Trainer restores from a checkpoint that no longer fits the run
resumed (its learning rate under a changed length, its best checkpoint's path where the run was), a checkpoint with nothing
left to train (at max_steps, or where its run stopped early), and a log at every save (to every run)."""

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


class AtMaxSteps(Exception):
    """Raised by :class:`StopAtMaxSteps`: nothing is left to train."""

    pass


class StopAtMaxSteps(TrainerCallback):
    """Stops a resumed run before its first step when its checkpoint is at ``train.max_steps`` or its run stopped early
    there (:func:`sectune.training.engine.train` then finishes the run from it)."""

    def __init__(self, stopped: bool = False):
        self.stopped = stopped  # the checkpoint's own run had stopped there (early stopping)

    def on_step_begin(self, args, state, control, **kw):
        if self.stopped or (state.max_steps > 0 and state.global_step >= state.max_steps):
            raise AtMaxSteps


class LogAtSave(TrainerCallback):
    """A step that saves a checkpoint also logs: Trainer keeps the loss since its last log in memory, not in the
    checkpoint, so with ``train.logging_steps`` not dividing ``train.save_steps`` a resumed run's train_loss left out the
    steps between that log and the checkpoint (an audit, session 41: 7.9319 against the uninterrupted run's 7.8609).
    Added to every run, interrupted or not, so that both log the same steps."""

    def on_step_end(self, args, state, control, **kw):
        if control.should_save:
            control.should_log = True


def stopped_early(resume: str) -> bool:
    """Whether the checkpoint's run had decided to stop there before its max_steps (``TrainerControl.should_training_stop``
    in its trainer_state.json, an early stop): Trainer clears it when training begins, so a resume trained on past the stop.
    A checkpoint at its run's own max_steps records a stop too; a resume that lengthens the run goes on from it."""
    import json

    try:
        state = json.loads((Path(resume) / "trainer_state.json").read_text(encoding="utf-8"))
        stop = bool(state["stateful_callbacks"]["TrainerControl"]["args"]["should_training_stop"])
        return stop and int(state["global_step"]) < int(state["max_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
