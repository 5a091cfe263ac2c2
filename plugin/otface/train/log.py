"""Log file, console and TensorBoard output of a training run."""

from __future__ import annotations

import errno
import logging
import math
import os
import sys
import threading
import time
import warnings

import torch

from otface.console_log import ConsoleHandler
from otface.train.wandb_log import redact

__all__ = [
    "OutputWriteError",
    "SafeSummaryWriter",
    "close_log_file",
    "init_logging",
    "log_config",
    "log_run_header",
    "tensorboard_dir",
    "MetricMeter",
    "StepLogger",
    "raise_write_failure",
]

_FORMAT = "Training: %(asctime)s-%(message)s"


class OutputWriteError(RuntimeError):
    """The log file or TensorBoard's events could not be written (a full disk, say)."""


# The first failed write of the log file or of TensorBoard's events: (file, error). Recorded
# where it happens (a logging handler, TensorBoard's writer thread), raised in the training
# loop by raise_write_failure().
_FAILED_WRITE: list[tuple[str, OSError]] = []


def _record_failure(path: str, err: OSError) -> None:
    if not _FAILED_WRITE:
        _FAILED_WRITE.append((path, err))


def raise_write_failure() -> None:
    """Raise :class:`OutputWriteError` if a log or TensorBoard write has failed (one line
    naming the file and the OS's reason)."""
    if not _FAILED_WRITE:
        return
    path, err = _FAILED_WRITE.pop()
    code = errno.errorcode.get(err.errno or 0, "")
    why = f"{err.strerror} ({code})" if err.strerror else str(err)
    # The caller adds which checkpoints this run wrote (none, or the last one and its step).
    raise OutputWriteError(f"cannot write {path}: {why}; training stopped")


class _LogFileHandler(logging.FileHandler):
    """``training.log``: a failed write is recorded for the loop to stop on, not printed as a
    ``--- Logging error ---`` traceback."""

    def handleError(self, record: logging.LogRecord) -> None:
        err = sys.exc_info()[1]
        if isinstance(err, OSError):
            _record_failure(self.baseFilename, err)
            return
        super().handleError(record)


class SafeSummaryWriter:
    """TensorBoard's ``SummaryWriter`` whose write errors (from its calls or its background
    writer thread) are recorded for the loop to stop on, with the events file's name, instead
    of a thread traceback."""

    def __init__(self, log_dir: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        self._writer = SummaryWriter(log_dir=log_dir)
        event_writer = getattr(self._writer._get_file_writer(), "event_writer", None)
        self.file_name = getattr(event_writer, "_file_name", None) or log_dir
        _WRITER_FILES.add(self.file_name)

    def _call(self, name: str, *args, **kwargs):
        try:
            return getattr(self._writer, name)(*args, **kwargs)
        except OSError as err:
            _record_failure(self.file_name, err)

    def add_scalar(self, *args, **kwargs):
        return self._call("add_scalar", *args, **kwargs)

    def flush(self):
        return self._call("flush")

    def close(self):
        return self._call("close")


_WRITER_FILES: set[str] = set()
_previous_excepthook = threading.excepthook


def _thread_excepthook(args) -> None:
    # TensorBoard's background writer thread: an OSError there is recorded (and stops the run
    # in the loop), not printed as "Exception in thread ...".
    if isinstance(args.exc_value, OSError) and _WRITER_FILES:
        _record_failure(sorted(_WRITER_FILES)[0], args.exc_value)
        return
    _previous_excepthook(args)


def init_logging(rank: int, output: str) -> logging.Logger:
    """Rank 0 logs to ``output/training.log`` and stdout; other ranks log warnings only."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    if rank == 0:
        root.setLevel(logging.INFO)
        formatter = logging.Formatter(_FORMAT)
        file_handler = _LogFileHandler(os.path.join(output, "training.log"))
        stream_handler = ConsoleHandler("stdout")
        # Records logged with extra={"file_only": True} (the full config dump) stay off the
        # screen.
        stream_handler.addFilter(lambda record: not getattr(record, "file_only", False))
        for handler in (file_handler, stream_handler):
            handler.setFormatter(formatter)
            root.addHandler(handler)
    else:
        root.setLevel(logging.WARNING)
        root.addHandler(ConsoleHandler("stderr"))
        # Library deprecation notices are the same on every rank: rank 0 logs them once.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    # Python warnings go to the log as one line in words (no source line), each once per place.
    warnings.showwarning = _log_warning
    _WARNED_PLACES.clear()
    _FAILED_WRITE.clear()
    threading.excepthook = _thread_excepthook
    return root


def close_log_file() -> None:
    """Stop writing ``training.log`` (the console handlers stay): before a failed start
    removes what it wrote."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()


# Places (file, line, category) whose Python warning this run has logged. Python's own
# once-per-place registry is cleared whenever any code changes the warning filters (a
# `warnings.catch_warnings()` in a library's forward does, on every step), so a deprecation
# warning of a backbone's forward would otherwise be logged on every step.
_WARNED_PLACES: set[tuple[str, int, str]] = set()


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    place = (str(filename), int(lineno or 0), category.__name__)
    if place in _WARNED_PLACES:
        return
    _WARNED_PLACES.add(place)
    logging.getLogger("py.warnings").warning(
        "%s: %s (logged once per run)", category.__name__, message
    )


def tensorboard_dir(cfg, run_id: str) -> str:
    """``output/tensorboard/<run id>``: one sub-folder per run, so that TensorBoard shows
    runs apart; a resumed run continues its own (or, for a run from before run ids, the
    newest one)."""
    root = os.path.join(cfg.output, "tensorboard")
    own = os.path.join(root, run_id)
    if cfg.resume and not os.path.isdir(own) and os.path.isdir(root):
        runs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if runs:
            return os.path.join(root, runs[-1])
    return own


def log_run_header(cfg, world_size: int, run_id: str) -> None:
    """The line that opens this start's part of the log, naming its run (a resume names the
    run it continues: :func:`otface.train.identity.log_run_id` reads it back)."""
    logging.info(
        "==== run started %s: %s (run %s, resume = %s, %d rank%s) ====",
        time.strftime("%Y-%m-%d %H:%M:%S"),
        " ".join(sys.argv) or "(library call)",
        run_id,
        cfg.resume,
        world_size,
        "" if world_size == 1 else "s",
    )


def log_config(cfg, total_step: int) -> None:
    """A one-line summary on screen, and every key in the log."""
    loss = cfg.loss
    if loss == "otface":
        loss += f" (lambda_ot {cfg.otface.lambda_ot:g}, {cfg.otface.distance})"
    logging.info(
        "%s, %s, batch %d per rank, %d steps, output %s (every config key: training.log)",
        cfg.network,
        loss,
        cfg.batch_size,
        total_step,
        cfg.output,
    )
    for key, value in cfg.items():
        shown = redact(key, value)
        logging.info(": %s %s", key.ljust(25), shown, extra={"file_only": True})


class MetricMeter:
    """Running sums of scalar tensors, kept on their device until read (no per-step sync).

    Each metric is averaged over the steps that reported it (some, such as the gradient
    shares, come only on log steps)."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}

    def update(self, metrics: dict[str, torch.Tensor]) -> None:
        for name, value in metrics.items():
            value = value.detach().float()
            prev = self._sums.get(name)
            self._sums[name] = value if prev is None else prev + value
            self._counts[name] = self._counts.get(name, 0) + 1

    def averages(self) -> dict[str, float]:
        return {name: float(total) / self._counts[name] for name, total in self._sums.items()}

    def reset(self) -> None:
        self._sums.clear()
        self._counts.clear()


UNCONVERGED_WARN_FRACTION = 0.001
"""A log window whose share of unconverged Sinkhorn problems passes this warns (once)."""


class StepLogger:
    """One log line and TensorBoard scalars every ``frequent`` steps (rank 0 only), and the same
    values to W&B when ``wandb`` (a :class:`otface.train.wandb_log.WandbLogger`) is given.

    The line keeps arcface_torch's fields (speed, loss, learning rate, epoch, step, ETA), followed
    by the criterion's other metrics.
    """

    def __init__(
        self,
        *,
        frequent: int,
        total_step: int,
        batch_size: int,
        world_size: int,
        start_step: int = 0,
        writer: object | None = None,
        wandb: object | None = None,
    ) -> None:
        self.frequent = frequent
        self.wandb = wandb
        self.total_step = total_step
        self.samples_per_step = batch_size * world_size
        self.start_step = start_step
        self.writer = writer
        self.meter = MetricMeter()
        self._t_start = time.time()
        self._tic: float | None = None
        self._last_step = start_step
        self._warned_unconverged = False

    def __call__(
        self,
        global_step: int,
        metrics: dict[str, torch.Tensor],
        *,
        epoch: int,
        lr: float,
        grad_scale: float | None = None,
        counters: dict[str, int] | None = None,
    ) -> str | None:
        """Add this step's metrics; on every ``frequent``-th step write the line.

        ``counters`` are host-side running totals (skipped steps, undecodable images) shown on
        the line and in TensorBoard as they are.
        """
        self.meter.update(metrics)
        # A line every `frequent` steps, and one after the first step of a start or a resume,
        # so that a person sees progress within seconds. Each line's speed covers the steps
        # since the previous line (the first one's includes start-up).
        first = global_step == self.start_step + 1
        if global_step % self.frequent != 0 and not first:
            return None
        now = time.time()
        since = self._t_start if self._tic is None else self._tic
        steps = global_step - (self.start_step if self._tic is None else self._last_step)
        self._last_step = global_step
        speed = max(steps, 1) * self.samples_per_step / max(now - since, 1e-9)
        done = max(global_step - self.start_step, 1)
        eta_hours = (now - self._t_start) / done * (self.total_step - global_step) / 3600
        avg = self.meter.averages()
        loss = avg.pop("loss", float("nan"))
        step_loss = float(metrics["loss"]) if "loss" in metrics else loss
        msg = (
            f"Speed {speed:.2f} samples/sec   Loss {loss:.4f}   LearningRate {lr:.6f}   "
            f"Epoch: {epoch}   Global Step: {global_step}   "
        )
        if grad_scale is not None:
            msg += f"Fp16 Grad Scale: {grad_scale:.0f}   "
        msg += f"Required: {eta_hours:.2f} hours"
        if avg:
            msg += "   " + "   ".join(f"{k} {_fmt(v)}" for k, v in avg.items())
        for name, count in (counters or {}).items():
            msg += f"   {name} {count}"
        logging.info(msg)
        self._check_unconverged(avg.get("sinkhorn_unconverged"), global_step)
        raise_write_failure()
        if self.writer is not None:
            self.writer.add_scalar("time_for_end", eta_hours, global_step)
            self.writer.add_scalar("learning_rate", lr, global_step)
            self.writer.add_scalar("loss", loss, global_step)
            for name, value in avg.items():
                self.writer.add_scalar(name, value, global_step)
            for name, count in (counters or {}).items():
                self.writer.add_scalar(name, count, global_step)
        if self.wandb is not None:
            self.wandb.log_step(
                global_step,
                epoch=epoch,
                step_loss=step_loss,
                window_loss=loss,
                lr=lr,
                metrics=avg,
                counters=counters,
                grad_scale=grad_scale,
            )
        self.meter.reset()
        self._tic = now
        return msg

    def _check_unconverged(self, fraction: float | None, global_step: int) -> None:
        if fraction is None or self._warned_unconverged:
            return
        if not fraction > UNCONVERGED_WARN_FRACTION:
            return
        self._warned_unconverged = True
        logging.warning(
            "step %d: %.2f%% of the Sinkhorn problems of the last %d steps stopped at "
            "otface.max_iter before reaching otface.tol, so their OT gradients are inexact; "
            "raise otface.max_iter, or otface.eps_scaling (e.g. 0.5), or otface.epsilon "
            "(warned once; sinkhorn_unconverged on every log line)",
            global_step,
            100 * fraction,
            self.frequent,
        )


def _fmt(value: float) -> str:
    if not math.isfinite(value):  # NaN/Inf are logged as such ("nan", "inf", "-inf")
        return str(value)
    if value == int(value) and abs(value) < 1e6:
        return f"{value:.0f}"
    return f"{value:.4g}"
