"""Task registry: config name -> Task class."""

from klrl.tasks.arith import ArithTask
from klrl.tasks.base import Problem, Task
from klrl.tasks.countdown import CountdownTask
from klrl.tasks.hendrycks_math import MathTask
from klrl.tasks.mmlu import MmluTask

TASKS: dict[str, type[Task]] = {t.name: t for t in (ArithTask, MathTask, MmluTask, CountdownTask)}

__all__ = ["TASKS", "Problem", "Task"]
