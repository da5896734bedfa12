"""The steps of a run (``fastpfc.doc.schedule``): how many within ``--time-budget``, and their learning rates."""

import pytest
import torch

from fastpfc.doc.config import TrainConfig
from fastpfc.doc.schedule import DEFAULT_BUDGET_MINUTES, StepPlan, budget_minutes, steps_within, warmup_then_decay

CPU = torch.device("cpu")


def test_the_default_run_has_a_budget_and_a_run_given_its_steps_has_none_unless_asked():
    assert budget_minutes(TrainConfig()) == DEFAULT_BUDGET_MINUTES == 9.0
    assert budget_minutes(TrainConfig(steps=801)) == budget_minutes(TrainConfig(steps=200_000)) == 0.0
    assert budget_minutes(TrainConfig(steps=200_000, time_budget=600.0)) == 600.0
    assert budget_minutes(TrainConfig(time_budget=0.0)) == 0.0


def test_a_run_that_fits_keeps_its_steps_and_one_that_does_not_trains_what_fits():
    # 40 steps done in 60 s, 0.625 s a step, 30 s of final evaluation: 800 steps end at 565 s
    assert steps_within(800, 40, 0.625, 60.0, 30.0, 565.0) == 800
    assert steps_within(800, 40, 0.625, 60.0, 30.0, 560.0) == 790  # 40 + 752, rounded down to a multiple of 10
    assert steps_within(800, 40, 1.0, 60.0, 30.0, 540.0) == 490  # 40 + 450
    assert steps_within(800, 40, 1.0, 60.0, 30.0, 533.0) == 480  # 40 + 443
    assert steps_within(800, 37, 1.0, 600.0, 30.0, 540.0) == 37  # already over: stop where it is


def _steps(plan: StepPlan, seconds: list[float], now: float) -> list[str | None]:
    """Feed ``plan`` steps 1, 2, ... taking ``seconds`` each, the last ending at ``now``."""
    return [plan.after_step(step, took, now, 1, CPU) for step, took in enumerate(seconds, start=1)]


def test_the_plan_decides_once_at_the_end_of_the_warm_up_or_step_40_and_resumes_its_decision():
    plan = StepPlan(800, budget_minutes=9.0, warmup_steps=50, started=0.0)
    assert plan.decision_step == 40 and plan.state() == {"planned_steps": None, "evaluation_seconds": 0.0}
    plan.evaluation_seconds = 30.0
    seconds = [5.0] * 10 + [1.0] * 30  # the first quarter (the loader starting) is left out
    said = _steps(plan, seconds, now=60.0)
    assert said[:39] == [None] * 39 and plan.steps == 490  # 60 s so far, 1 s a step, 30 s to evaluate
    assert "800 steps would end after 14.2 minutes, over --time-budget 9: training 490 steps" in said[39]
    assert plan.after_step(41, 1e3, 600.0, 1, CPU) is None and plan.steps == 490  # decided once
    assert plan.state() == {"planned_steps": 490, "evaluation_seconds": 30.0}
    resumed = StepPlan(800, budget_minutes=9.0, warmup_steps=50, started=1e6)
    resumed.load_state(plan.state(), saved_steps=800)
    assert resumed.steps == 490 and resumed.evaluation_seconds == 30.0
    assert _steps(resumed, [1e3] * 40, now=1e7) == [None] * 40 and resumed.steps == 490
    asked_more = StepPlan(1000, budget_minutes=9.0, warmup_steps=50, started=0.0)
    asked_more.load_state(plan.state(), saved_steps=800)  # --steps changed on resume: the new one holds
    assert asked_more.steps == 1000
    unlimited = StepPlan(800, budget_minutes=0.0, warmup_steps=50, started=0.0)
    unlimited.load_state(plan.state(), saved_steps=800)  # --time-budget 0 on resume: every step
    assert unlimited.steps == 800
    legacy = StepPlan(800, budget_minutes=9.0, warmup_steps=50, started=0.0)
    legacy.load_state(None, saved_steps=800)  # a checkpoint older than the budget
    assert legacy.steps == 800 and legacy.state()["planned_steps"] is None


@pytest.mark.parametrize("budget, warmup, steps, decides_at", [(0.0, 50, 800, None), (9.0, 50, 30, None),
                                                               (9.0, 10, 800, 10), (9.0, 0, 800, 2)])
def test_no_decision_without_a_budget_or_steps_after_it_and_at_least_two_steps_measured(budget, warmup, steps,
                                                                                         decides_at):
    plan = StepPlan(steps, budget_minutes=budget, warmup_steps=warmup, started=0.0)
    said = _steps(plan, [100.0] * 50, now=1e4)
    if decides_at is None:
        assert said == [None] * 50 and plan.steps == steps == plan.state()["planned_steps"]
    else:
        assert plan.decision_step == decides_at and plan.steps == decides_at
        assert [message is not None for message in said] == [step == decides_at for step in range(1, 51)]


@pytest.mark.parametrize("schedule", ["cosine", "poly"])
def test_the_learning_rate_warms_up_then_decays_to_zero_at_the_planned_last_step(schedule):
    plan = StepPlan(100, budget_minutes=0.0, warmup_steps=10, started=0.0)
    factor = warmup_then_decay(TrainConfig(steps=100, warmup_steps=10, schedule=schedule), plan)
    assert [factor(step) for step in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert factor(10) == 1.0 and factor(100) == pytest.approx(0.0, abs=1e-12)
    halfway = factor(55)
    assert halfway == pytest.approx(0.5 if schedule == "cosine" else 0.25)
    plan.steps = 55  # a shortened run decays to 0 at its own last step
    assert factor(55) == pytest.approx(0.0, abs=1e-12) and factor(10) == 1.0
