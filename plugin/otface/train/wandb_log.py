"""Weights & Biases logging of a training run, with arcface_torch's config keys and metric names.

Rank 0 logs, when ``using_wandb = True`` (``wandb_log_all`` is accepted for upstream configs,
but other ranks do not open runs: their losses are the same step's, their OT metrics are
reduced to rank 0's log line anyway). On every log line (``frequent`` steps):

- ``Loss/Step Loss`` (this step's loss), ``Loss/Train Loss`` (mean over the window),
  ``Process/Step``, ``Process/Epoch``: arcface_torch's names;
- ``OT/<name>`` for the criterion's other metrics (``OT/loss_ot``, ``OT/n_hard``, the Sinkhorn
  figures, the gradient shares, ``OT/loss_margin``);
- ``Train/LearningRate``, ``Train/skipped_steps``, ``Train/bad_images``, ``Train/grad_scale``.

Verification adds ``Acc/val-Acc1 <set>`` and ``Acc/val-Acc2 <set>`` (without and with the flip
test), as upstream's callback. Every chart's x axis is ``Process/Step``, the global step, so a
resumed run continues its curves where its checkpoint left off.

``save_artifacts`` uploads ``model.pt`` after each epoch as ``{run name}_E{epoch}`` and at the
end as ``{run name}_Final``. The run's id and name are kept in ``<output>/wandb_run.json``;
with ``resume = True`` and ``wandb_resume = True`` the same run continues.

``wandb_key`` (when it is not base.py's placeholder) is handed to wandb through the process
environment, never written to the log, the config dump, TensorBoard or the W&B config. A W&B
error (network, quota, a bad key) never stops training: it is logged once, W&B logging stops
and TensorBoard goes on.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import string
import time
from typing import Any, Mapping

__all__ = ["RUN_FILE", "WandbLogger", "hidden_config", "is_placeholder_key", "redact"]

RUN_FILE = "wandb_run.json"
_SECRET_KEYS = ("wandb_key",)


def is_placeholder_key(key: Any) -> bool:
    """True for an empty key or base.py's ``"XXXX..."`` placeholder."""
    return not key or set(str(key)) == {"X"}


def redact(key: str, value: Any) -> Any:
    """The value to show for config key ``key``: secrets are replaced by a note."""
    if key in _SECRET_KEYS and not is_placeholder_key(value):
        return "(set, not shown)"
    return value


def hidden_config(cfg: Mapping) -> dict:
    """A plain copy of ``cfg`` without the secret keys, for the W&B run's config."""

    def plain(value):
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, tuple):
            return list(value)
        return value

    return {k: plain(v) for k, v in cfg.items() if k not in _SECRET_KEYS}


def _read_run_file(output: str) -> dict | None:
    path = os.path.join(output, RUN_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logging.warning("W&B: cannot read %s (%s); a new W&B run is started", path, exc)
        return None
    if not isinstance(state, dict) or not state.get("id") or not state.get("name"):
        logging.warning("W&B: %s holds no run id; a new W&B run is started", path)
        return None
    return state


def _write_run_file(output: str, run_id: str, name: str) -> None:
    path = os.path.join(output, RUN_FILE)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"id": run_id, "name": name}, f)
        f.write("\n")
    os.replace(tmp, path)


class WandbLogger:
    """One W&B run on rank 0; every call is a no-op after the first W&B error."""

    def __init__(self, run, name: str) -> None:
        self.run = run
        self.name = name
        self.failed = False

    @classmethod
    def start(cls, cfg, *, rank: int) -> "WandbLogger | None":
        """Open (or, on resume with ``wandb_resume``, continue) the run of ``cfg``; None when
        W&B is off, on other ranks, or when W&B cannot start (logged, training goes on)."""
        if not cfg.get("using_wandb") or rank != 0:
            return None
        import wandb  # presence checked when the config was validated

        if not is_placeholder_key(cfg.get("wandb_key")):
            os.environ["WANDB_API_KEY"] = str(cfg.wandb_key)
        previous = _read_run_file(cfg.output) if cfg.resume and cfg.wandb_resume else None
        if previous is not None:
            run_id, name = str(previous["id"]), str(previous["name"])
        else:
            alphabet = string.ascii_lowercase + string.digits
            run_id = "".join(secrets.choice(alphabet) for _ in range(8))  # wandb's id form
            name = time.strftime("%y%m%d_%H%M") + f"_GPU{rank}"
            if cfg.get("suffix_run_name"):
                name += f"_{cfg.suffix_run_name}"
        try:
            run = wandb.init(
                entity=cfg.wandb_entity,
                project=cfg.wandb_project,
                name=name,
                id=run_id,
                resume="allow" if previous is not None else None,
                notes=cfg.get("notes") or None,
                dir=cfg.output,
                config=hidden_config(cfg),
            )
            run.define_metric("Process/Step")
            run.define_metric("*", step_metric="Process/Step")
        except Exception as exc:  # network, a bad key, a full disk: training goes on
            logging.warning(
                "W&B could not start (%s: %s); training goes on, logged to TensorBoard only",
                type(exc).__name__,
                exc,
            )
            return None
        _write_run_file(cfg.output, run.id, name)
        logging.info(
            "W&B: %s run %s (%s), project %s%s",
            "continuing" if previous is not None else "started",
            run.id,
            name,
            cfg.wandb_project,
            f" (mode {run.settings.mode})" if getattr(run, "settings", None) else "",
        )
        return cls(run, name)

    def _guard(self, what: str, call) -> None:
        if self.failed:
            return
        try:
            call()
        except Exception as exc:
            self.failed = True
            logging.warning(
                "W&B %s failed (%s: %s); W&B logging stops here, training goes on with "
                "TensorBoard (warned once)",
                what,
                type(exc).__name__,
                exc,
            )

    def log(self, values: Mapping[str, float], global_step: int) -> None:
        """Log ``values`` at ``global_step`` (written as ``Process/Step``)."""
        payload = {**values, "Process/Step": global_step}
        self._guard("log", lambda: self.run.log(payload))

    def log_step(
        self,
        global_step: int,
        *,
        epoch: int,
        step_loss: float,
        window_loss: float,
        lr: float,
        metrics: Mapping[str, float],
        counters: Mapping[str, int] | None = None,
        grad_scale: float | None = None,
    ) -> None:
        """One log line's values under arcface_torch's names and ours (module docstring)."""
        values: dict[str, float] = {
            "Loss/Step Loss": step_loss,
            "Loss/Train Loss": window_loss,
            "Process/Epoch": epoch,
            "Train/LearningRate": lr,
        }
        values.update({f"OT/{k}": v for k, v in metrics.items()})
        values.update({f"Train/{k}": v for k, v in (counters or {}).items()})
        if grad_scale is not None:
            values["Train/grad_scale"] = grad_scale
        self.log(values, global_step)

    def log_artifact(self, path: str, name: str) -> None:
        """Upload the file ``path`` as model artifact ``name``."""

        def upload():
            import wandb

            artifact = wandb.Artifact(name, type="model")
            artifact.add_file(path)
            self.run.log_artifact(artifact)

        self._guard(f"artifact {name}", upload)

    def finish(self, exit_code: int = 0) -> None:
        self._guard("finish", lambda: self.run.finish(exit_code=exit_code))
