"""Model sources, tasks and evaluation data: everything later stages need to know about the user's model."""

from inferforge.models.data import EvalData, load_data
from inferforge.models.loaded import LoadedModel
from inferforge.models.sources import DEFAULT_MODEL, load_model, state_dict_sha256
from inferforge.models.tasks import TASKS, Task, get_task

__all__ = [
    "DEFAULT_MODEL",
    "TASKS",
    "EvalData",
    "LoadedModel",
    "Task",
    "get_task",
    "load_data",
    "load_model",
    "state_dict_sha256",
]
