"""deepfleet's own tasks: the one list of their names. Tasks from other packages register through
the `deepfleet.tasks` entry point group (jobs.tasks)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from jobs.config import AutonomousRecipe, RecsysRecipe, RetinopathyRecipe
from jobs.tasks import TaskSpec

SPECS = (
    TaskSpec("retinopathy", RetinopathyRecipe, "jobs.tasks.retinopathy", "serve.codecs:RETINOPATHY"),
    TaskSpec("autonomous", AutonomousRecipe, "jobs.tasks.autonomous", "serve.codecs:AUTONOMOUS"),
    TaskSpec("recsys", RecsysRecipe, "jobs.tasks.recsys", "serve.codecs:RECSYS"),
)

if TYPE_CHECKING:  # the type check holds each functions module to the TaskFunctions protocol
    from jobs.tasks import TaskFunctions, autonomous, recsys, retinopathy

    _RETINOPATHY: TaskFunctions = retinopathy
    _AUTONOMOUS: TaskFunctions = autonomous
    _RECSYS: TaskFunctions = recsys
