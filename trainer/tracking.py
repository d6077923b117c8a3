"""Experiment tracking (W&B): main process only, offline when no API key, resumed runs continue the same run id."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from recipes.schema import TrackingConfig


class Tracker:
    """No-op unless tracking.mode is offline/online; online falls back to offline without WANDB_API_KEY."""

    def __init__(self, config: TrackingConfig, run_dir: Path, run_config: dict[str, Any], enabled: bool):
        self.run = None
        if not enabled or config.mode == "off":
            return
        import wandb

        mode = "online" if config.mode == "online" and os.environ.get("WANDB_API_KEY") else "offline"
        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self.run = wandb.init(
            project=config.project, name=config.run_name or run_dir.name, group=config.group, tags=config.tags,
            config=run_config, dir=str(run_dir), id=run_id, resume="allow", mode=mode,
        )

    def log(self, values: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
