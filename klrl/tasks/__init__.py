"""Task registry: config name -> Task class."""

from klrl.tasks.arith import ArithTask
from klrl.tasks.base import Problem, Task

TASKS: dict[str, type[Task]] = {ArithTask.name: ArithTask}

__all__ = ["TASKS", "Problem", "Task"]
