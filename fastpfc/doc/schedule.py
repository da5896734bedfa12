"""The steps of a ``train.py`` run: how many (``--steps``, or fewer where ``--time-budget`` would
not hold on this machine) and the learning rate of each.

At the end of the warm-up (step 40 at the latest) the run measures the median wall-clock time of
its steps so far (data loading included; the first quarter, which starts the loader, left out)
and predicts its end: the time since it started, the steps left at that pace, and the final
evaluation, taken to last as long as the evaluation before training (which also rendered the
evaluation images, so the estimate errs long). Over the budget, it trains as many steps as fit,
rounded down to a multiple of 10. The warm-up's learning rates do not depend on the number of
steps, so with ``--warmup-steps`` of 40 or more the shortened run is exactly the run started with
that ``--steps``. The decision is stored in the checkpoint: a resumed run keeps it.
"""

from __future__ import annotations

import math
import statistics

import torch

from .config import TrainConfig
from .ranks import agree

#: The latest step at which the number of steps is decided.
DECIDE_BY = 40
#: ``--time-budget -1`` with the default ``--steps``: ``python train.py`` must end within 10
#: minutes on a slow 2-core CPU, and the interpreter's start and imports come on top.
DEFAULT_BUDGET_MINUTES = 9.0


def budget_minutes(config: TrainConfig) -> float:
    """The run's budget in minutes (0: none): ``--time-budget``, or with -1
    :data:`DEFAULT_BUDGET_MINUTES` when ``--steps`` is its default and none when it was given."""
    if config.time_budget != -1:
        return config.time_budget
    return DEFAULT_BUDGET_MINUTES if config.steps == TrainConfig.steps else 0.0


def steps_within(requested: int, step: int, pace: float, elapsed: float, final_seconds: float,
                 budget_seconds: float) -> int:
    """``requested``, or the steps (a multiple of 10, at least ``step``) that end the run within
    ``budget_seconds`` when ``step`` steps are done after ``elapsed`` seconds, each next one takes
    ``pace`` seconds and the final evaluation ``final_seconds``."""
    if elapsed + (requested - step) * pace + final_seconds <= budget_seconds:
        return requested
    fitting = step + int(max(0.0, budget_seconds - elapsed - final_seconds) / max(pace, 1e-9))
    return max(step, fitting // 10 * 10)


class StepPlan:
    """The steps of a run (``steps``): ``--steps``, or what :func:`steps_within` decides at
    ``decision_step`` unless ``--time-budget`` is 0 or a resumed checkpoint holds the decision.
    ``evaluation_seconds`` is set once the evaluation before training has run."""

    def __init__(self, requested: int, budget_minutes: float, warmup_steps: int, started: float) -> None:
        self.requested, self.budget_seconds, self.started = requested, 60.0 * budget_minutes, started
        self.decision_step = max(2, min(warmup_steps, DECIDE_BY))
        self.steps, self.evaluation_seconds, self.step_seconds = requested, 0.0, []
        self.decided = budget_minutes == 0 or requested <= self.decision_step

    def state(self) -> dict:
        """What a checkpoint keeps: the decision (None until taken) and the evaluation's seconds."""
        return {"planned_steps": self.steps if self.decided else None, "evaluation_seconds": self.evaluation_seconds}

    def load_state(self, state: dict | None, saved_steps: int) -> None:
        """Resume from a checkpoint's :meth:`state` (None in checkpoints older than the budget),
        saved by a run of ``saved_steps`` requested steps: its decision holds unless ``--steps``
        changed since or the budget is now off, then ``--steps`` do."""
        if state is None:
            return
        self.evaluation_seconds = state["evaluation_seconds"]
        if state["planned_steps"] is not None:
            keep = saved_steps == self.requested and self.budget_seconds > 0
            self.steps, self.decided = state["planned_steps"] if keep else self.requested, True

    def after_step(self, step: int, seconds: float, now: float, world: int, device: torch.device) -> str | None:
        """Note that step ``step`` took ``seconds``, and take the decision if it is time; every
        rank takes the fewest steps any rank found. Returns what was decided when the run is
        shortened."""
        if self.decided:
            return None
        self.step_seconds.append(seconds)
        if step != self.decision_step:
            return None
        measured = self.step_seconds[len(self.step_seconds) // 4:]
        elapsed, pace = now - self.started, statistics.median(measured)
        fitting = steps_within(self.requested, step, pace, elapsed, self.evaluation_seconds, self.budget_seconds)
        self.steps, self.decided = -agree([-fitting], world, device)[0], True
        if self.steps == self.requested:
            return None
        end = elapsed + (self.requested - step) * pace + self.evaluation_seconds
        return (f"at {pace:.2f} s a step, {elapsed:.0f} s so far and about {self.evaluation_seconds:.0f} s of final "
                f"evaluation, {self.requested} steps would end after {end / 60:.1f} minutes, over --time-budget "
                f"{self.budget_seconds / 60:g}: training {self.steps} steps (--time-budget 0: all of them)")


def warmup_then_decay(config: TrainConfig, plan: StepPlan):
    """Learning-rate factor of each step: linear warm-up, then cosine or polynomial decay to 0 at
    the plan's last step."""
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, plan.steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress)) if config.schedule == "cosine" else (1 - progress) ** 2
    return factor
