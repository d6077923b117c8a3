"""Predictive process monitoring: next activity and remaining time at every prefix of an event log's cases.

Not a chat task: events are embedded rather than tokenized. The task declares the "event_sequence" workload
(trainer/process_monitoring.py: `EventWorkload`), takes its options from the recipe's `process` section, and
prepares its own shards (`prepare`: one row per case, columns `activity`, `next_activity`, ...).
"""

from __future__ import annotations

from pathlib import Path

from multitune.data_prep.cache import PreparedData, file_sha256
from multitune.data_prep.tasks.base import Record, Task
from multitune.data_prep.tasks.process_monitoring.eventlog import check_events, read_event_log, read_skpm
from multitune.data_prep.tasks.process_monitoring.features import eval_case_count, frame_digest, prepare_events
from multitune.data_prep.tasks.process_monitoring.generator import COLUMNS, generate_log
from multitune.recipes.errors import InputError


class ProcessMonitoring(Task):
    name = "process_monitoring"
    workload = "event_sequence"
    headline_metrics = ("next_activity_acc", "remaining_time_mae_days", "bayes_optimal_acc")

    def generate(self, n: int, seed: int) -> list[Record]:
        """`n` synthetic cases, one record per event (XES column names)."""
        return generate_log(n, seed).events.assign(**{COLUMNS["timestamp"]: lambda f: f[COLUMNS["timestamp"]]
                                                      .astype(str)}).to_dict("records")

    def with_options(self, options) -> Task:
        if options != type(options)():
            raise InputError("data.task_options: task process_monitoring is configured by the `process` section")
        return self

    def prepare(self, recipe) -> PreparedData:
        """Shards of the recipe's event log: synthetic (data.generator), a file (data.train_file) or skpm."""
        data, process = recipe.data, recipe.process
        if data.generator is not None:
            spec = data.generator
            synthetic = generate_log(spec.n_train + spec.n_eval, spec.seed)
            frame = check_events(synthetic.events, process.columns, "generator", 1)
            source = {"generated": frame_digest(frame)}
            return prepare_events(frame, data, process, source, spec.n_eval, synthetic.bayes)
        if data.train_file is not None:
            if data.eval_file is not None:
                raise InputError("data.eval_file: process_monitoring splits one log by case start time; "
                                 "give only data.train_file (and data.eval_fraction)")
            frame = read_event_log(data.train_file, process.columns)
            source = {"file": file_sha256(data.train_file), "eval_fraction": data.eval_fraction}
        else:
            frame = read_skpm(process.skpm_log, Path(data.cache_dir) / "skpm", process.columns)
            source = {"skpm": process.skpm_log, "content": frame_digest(frame), "eval_fraction": data.eval_fraction}
        n_cases = frame[process.columns.case].nunique()
        return prepare_events(frame, data, process, source, eval_case_count(n_cases, data.eval_fraction))
