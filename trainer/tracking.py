"""Experiment tracking (W&B or MLflow): main process only, never fails a run over the network, never logs secrets."""

from __future__ import annotations

import json
import math
import os
import re
import uuid
import warnings
from pathlib import Path
from typing import Any

from multitune.recipes.schema import TrackingConfig

# Environment variables whose names look like credentials; their values are scrubbed from anything we log.
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH", re.IGNORECASE)
REDACTED = "<redacted>"
ID_FILE = "tracking.json"


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """Values of credential-like environment variables, longest first (so overlapping values redact fully)."""
    environ = os.environ if environ is None else environ
    found = {value for name, value in environ.items() if SECRET_NAME.search(name) and len(value) >= 8}
    return sorted(found, key=len, reverse=True)


def redact(value: Any, secrets: list[str]) -> Any:
    """A copy of a JSON-like value with every occurrence of a secret replaced by <redacted>."""
    if isinstance(value, dict):
        return {redact(k, secrets): redact(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, secrets) for v in value]
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
    return value


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}: the dotted keys used by overrides, sweeps and results tables."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def numeric(values: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class Tracker:
    """The run's tracker: no-op when tracking.mode is off or on non-main processes, else a W&B or MLflow backend.

    The backend's run id is kept in output_dir/tracking.json, so `--resume` continues the same tracked run.
    """

    def __init__(self, config: TrackingConfig, run_dir: Path, run_config: dict[str, Any], enabled: bool):
        self.backend = None
        if not enabled or config.mode == "off":
            return
        self.secrets = secret_values()
        id_file = run_dir / ID_FILE
        saved = json.loads(id_file.read_text()) if id_file.is_file() else {}
        run_id = saved.get("run_id") if saved.get("backend") == config.backend else None
        run_config = redact(run_config, self.secrets)
        if config.backend == "mlflow":
            self.backend = MlflowBackend(config, run_dir, run_config, run_id)
        else:
            # A W&B sweep agent starts each trial with the run id it was assigned in WANDB_RUN_ID.
            self.backend = WandbBackend(config, run_dir, run_config, run_id or os.environ.get("WANDB_RUN_ID"))
        id_file.write_text(json.dumps({"backend": config.backend, "run_id": self.backend.run_id}))

    def log(self, values: dict[str, Any], step: int) -> None:
        """Numeric values as time series at an optimizer step."""
        if self.backend is not None:
            self._guard(self.backend.log, numeric(values), step)

    def summary(self, values: dict[str, Any]) -> None:
        """One value per run (data hash, packing efficiency, final metrics)."""
        if self.backend is not None:
            self._guard(self.backend.summary, redact(values, self.secrets))

    def finish(self) -> None:
        if self.backend is not None:
            self._guard(self.backend.finish)
            self.backend = None

    def _guard(self, call, *args) -> None:
        # A tracking server going away mid-run must not cost the run: warn once, stop tracking, keep training.
        try:
            call(*args)
        except Exception as exc:  # noqa: BLE001 - any backend/network failure
            warnings.warn(f"tracking disabled after an error from {type(self.backend).__name__}: {exc}", stacklevel=2)
            self.backend = None


def wandb_server_problem(timeout: float = 10.0) -> str | None:
    """None when the W&B server (WANDB_BASE_URL) accepts a connection within `timeout`, else what went wrong.

    wandb.init waits up to its init_timeout before giving up on an unreachable server; this answers in seconds.
    """
    import socket
    import threading
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    host, port = url.hostname or "api.wandb.ai", url.port or (443 if url.scheme == "https" else 80)
    problem = [f"{host}:{port} did not answer within {timeout:.0f} s"]

    def probe() -> None:  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            problem.clear()
        except OSError as exc:
            problem[0] = f"{host}:{port}: {exc}"

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 2)
    return problem[0] if problem else None


class WandbBackend:
    """W&B: online when WANDB_API_KEY is set and the server answers, otherwise an offline run under output_dir."""

    def __init__(self, config: TrackingConfig, run_dir: Path, run_config: dict[str, Any], run_id: str | None):
        import wandb

        self.run_id = run_id or uuid.uuid4().hex[:12]
        online = config.mode == "online" and bool(os.environ.get("WANDB_API_KEY"))
        problem = wandb_server_problem() if online else None
        if config.mode == "online" and not online or problem:
            why = f"W&B server unreachable ({problem})" if problem else "no WANDB_API_KEY in the environment"
            print(f"[multitune] tracking: {why}, logging offline "
                  f"(sync later with `wandb sync {run_dir}/wandb/offline-run-*`)", flush=True)
            online = False
        kwargs = dict(project=config.project, name=config.run_name or run_dir.name, group=config.group,
                      tags=config.tags, config=run_config, dir=str(run_dir), id=self.run_id, resume="allow")
        # console capture off: stdout can carry anything a library prints (URLs with tokens); log.jsonl has it all.
        # meta off: it records the command line, which may hold override values.
        settings = dict(console="off", x_disable_meta=True, disable_git=True, save_code=False, init_timeout=60)
        try:
            self.run = wandb.init(mode="online" if online else "offline", settings=wandb.Settings(**settings),
                                  **kwargs)
        except Exception as exc:  # noqa: BLE001 - server refusing (bad key, timeout): never fail the run for it
            if not online:
                raise
            reason = " ".join(str(exc).split())[:160]
            print(f"[multitune] tracking: W&B refused the run ({reason}); logging offline instead", flush=True)
            wandb.teardown()  # the failed online attempt still holds the run id in wandb's service
            self.run = wandb.init(mode="offline", settings=wandb.Settings(**settings), **kwargs)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        self.run.summary.update(values)

    def finish(self) -> None:
        self.run.finish()


class MlflowBackend:
    """MLflow: the recipe as params, steps as metrics; by default a SQLite store inside output_dir.

    MLflow 3 refuses its old file store by default, so the local default is `sqlite:///<output_dir>/mlflow.db`
    with artifacts in `<output_dir>/mlartifacts`; `tracking.uri` (or MLFLOW_TRACKING_URI when online) points
    at a server instead.
    """

    def __init__(self, config: TrackingConfig, run_dir: Path, run_config: dict[str, Any], run_id: str | None):
        from mlflow.tracking import MlflowClient

        local = f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        remote = config.uri or (os.environ.get("MLFLOW_TRACKING_URI") if config.mode == "online" else None)
        self.client = MlflowClient(remote or local)
        experiment = self.client.get_experiment_by_name(config.project)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            artifacts = None if remote else (run_dir / "mlartifacts").resolve().as_uri()
            experiment_id = self.client.create_experiment(config.project, artifact_location=artifacts)
        if run_id:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return
        tags = {"multitune.tags": ",".join(config.tags)} if config.tags else {}
        if config.group:
            tags["multitune.group"] = config.group
        run = self.client.create_run(experiment_id, run_name=config.run_name or run_dir.name, tags=tags)
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        params = [Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in flatten(run_config).items()]
        for start in range(0, len(params), 100):  # MLflow's per-request limit on params
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def summary(self, values: dict[str, Any]) -> None:
        self.log(numeric(values), step=0)
        for key, value in values.items():
            if isinstance(value, str):
                self.client.set_tag(self.run_id, key, value)

    def finish(self) -> None:
        self.client.set_terminated(self.run_id)
