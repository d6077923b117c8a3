"""The task registry: name in a recipe → Task object. A new task is one folder here plus one line below (a chat
task subclasses `ChatTask` and is trained by the shared chat workload; see `Task.workload`)."""

from __future__ import annotations

from multitune.data_prep.tasks.base import ChatExample, ChatTask, Record, Task
from multitune.data_prep.tasks.chat_jsonl import ChatJsonl
from multitune.data_prep.tasks.it_ticket_extraction import ITTicketExtraction
from multitune.data_prep.tasks.medical_qa import MedicalMCQ, MedicalQA
from multitune.data_prep.tasks.process_monitoring import ProcessMonitoring
from multitune.data_prep.tasks.rca_generation import RCAGeneration
from multitune.data_prep.tasks.ticket_classification import TicketClassification
from multitune.recipes.errors import InputError

TASKS: dict[str, Task] = {task.name: task for task in (
    TicketClassification(), ITTicketExtraction(), RCAGeneration(), MedicalQA(), MedicalMCQ(),
    ChatJsonl(), ProcessMonitoring(),
)}


def task_for(recipe) -> Task:
    """The recipe's task, configured by its `data.task_options` when the task takes options."""
    task = get_task(recipe.task).with_options(recipe.data.task_options)
    task.check_columns(recipe.data.columns)
    return task


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise InputError(f"unknown task '{name}' (known: {', '.join(sorted(TASKS))})") from None


__all__ = ["TASKS", "ChatExample", "ChatTask", "Record", "Task", "get_task", "task_for"]
