"""The command-line run: load the config, join the process group, train, and turn every
expected failure into one ``error:`` line and an exit code."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import sys
import time
from typing import Any, Callable

import torch

from otface.config import ConfigError, load_config
from otface.data.loader import TooManyBadImages
from otface.train.checkpoint import CheckpointError, checkpoint_path
from otface.train.distributed import (
    dead_local_peers,
    init_distributed,
    peers_on_other_hosts,
    shutdown_distributed,
)
from otface.train.guard import NonFiniteState, TooManySkippedSteps
from otface.train.log import OutputWriteError, init_logging
from otface.train.loop import BackboneFactory, fit, prepare_data
from otface.train.signals import RUN, Terminated, in_main_thread, raise_terminated

__all__ = ["main"]


EXISTING_RUN = ("refuse", "overwrite", "move-aside")


def main(
    config_path: str,
    *,
    load: Callable[[str], Any] = load_config,
    backbone_factory: BackboneFactory | None = None,
    existing: str = "refuse",
) -> int:
    """Command-line entry: load the config, join the process group, train. Returns exit code.

    ``load`` reads and validates the config (default :func:`otface.config.load_config`);
    ``backbone_factory`` is passed to :func:`fit`. Exit codes: 0 done, 1 a failure during
    training (one ``error:`` line), 2 a bad config or data (one ``error:`` line), 130
    interrupted by Ctrl-C or SIGTERM.

    ``existing``: what a fresh run (``resume = False``) does with an ``output`` folder that
    already holds a run: ``"refuse"`` (exit 2, naming the choices), ``"overwrite"`` (train
    there, replacing the old run's files as the new ones are written; its ``model.onnx`` and
    ``package/``, made from the old model, are removed first) or ``"move-aside"`` (rename the
    old folder to ``OUTPUT.YYYYmmdd-HHMMSS`` first; one process only).
    """
    if existing not in EXISTING_RUN:
        raise ValueError(f"existing must be one of {EXISTING_RUN}, got {existing!r}")
    try:
        cfg = load(config_path)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    RUN.reset()
    previous_handler = None
    if in_main_thread():
        previous_handler = signal.signal(signal.SIGTERM, raise_terminated)
    env = None
    try:
        env = init_distributed(timeout_s=float(cfg.collective_timeout_s))
        dataset = prepare_data(cfg)  # before anything is written: no empty log on bad data
        _claim_output(cfg, env, existing)
        _check_output_writable(cfg.output)
        init_logging(env.rank, cfg.output)
        if env.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        fit(cfg, env, backbone_factory=backbone_factory, dataset=dataset)
    except ConfigError as err:
        _report_error(str(err))
        return 2
    except (
        CheckpointError,
        TooManySkippedSteps,
        NonFiniteState,
        OutputWriteError,
        TooManyBadImages,
        OSError,
    ) as err:
        _report_error(str(err))
        return 1
    except RuntimeError as err:
        if not _lost_peer(err):
            raise
        _report_error(_lost_peer_message(err, cfg.output, env))
        return 1
    except KeyboardInterrupt as err:
        if isinstance(err, Terminated):
            dead = dead_local_peers()
            if dead:  # torchrun's stop after a rank of this node died, not a person's
                _report_error(_dead_rank_message(dead, cfg.output, env))
                return 1
        name = "SIGTERM" if isinstance(err, Terminated) else "Ctrl-C"
        message = _interrupted_message(cfg.output, name)
        if isinstance(err, Terminated) and peers_on_other_hosts():
            message += (
                ". Under torchrun this is either a stop of the job (a person or a scheduler) "
                "or torchrun ending every rank because a rank on another node died: its "
                "node's log says which"
            )
        if logging.getLogger().handlers:
            logging.warning(message)
        else:
            print(message, file=sys.stderr)
        return 130
    finally:
        # torchrun's SIGTERM while this rank shuts down must not turn its exit code into -15.
        if in_main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        shutdown_distributed()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    return 0


def _dead_rank_message(dead: list[tuple[int, int]], output: str, env) -> str:
    rank = f"rank {env.rank}" if env is not None else "this rank"
    who = ", ".join(f"rank {r} (pid {pid})" for r, pid in dead)
    return (
        f"{rank}{_at_step()}: {who} of this machine died, and torchrun is stopping the job; "
        f"{_this_runs_checkpoint(output)}"
        + (
            "; restart the job with resume = True (on any number of ranks)"
            if RUN.last_checkpoint is not None
            else ""
        )
    )


_RUN_FILES = ("model.pt", "training.log")
_STALE = ("model.onnx", "model.onnx.source.json", "package")  # made by otface.export


def _claim_output(cfg, env, existing: str) -> None:
    """A fresh run into a folder that holds another run: refuse, overwrite or move it aside
    (see :func:`main`)."""
    output = cfg.output
    if cfg.resume:
        return
    found: list[str] = []
    # Rank 0 looks, before it writes anything, and tells the others (which would otherwise
    # see the log it has just started).
    if env.rank == 0 and os.path.isdir(output):
        found = [name for name in _RUN_FILES if os.path.exists(os.path.join(output, name))]
        pattern = r"checkpoint_gpu_\d+\.pt"
        found += sorted(n for n in os.listdir(output) if re.fullmatch(pattern, n))
    if env.distributed:
        shared = [found]
        torch.distributed.broadcast_object_list(shared, src=0)
        found = shared[0]
    if not found:
        return
    if existing == "refuse":
        raise ConfigError(
            f"key 'output' = {output!r} already holds a run ({', '.join(found)}) and resume = "
            "False: set resume = True to continue it, choose another output, or run train.py "
            "with --overwrite (train there, replacing it) or --move-aside (keep it as "
            f"{os.path.basename(os.path.normpath(output))}.<date>)"
        )
    if existing == "move-aside":
        if env.world_size > 1:
            raise ConfigError("--move-aside is for one process; with torchrun use --overwrite")
        aside = f"{os.path.normpath(output)}.{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(output, aside)
        print(f"moved the previous run in {output} aside to {aside}")
        return
    if env.rank == 0:  # overwrite: what was made from the old model must not stay beside the new
        for name in _STALE:
            path = os.path.join(output, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.unlink(path)


def _check_output_writable(output: str) -> None:
    try:
        os.makedirs(output, exist_ok=True)
        probe = os.path.join(output, f".write-test-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(
            f"key 'output' = {output!r}: the folder cannot be written "
            f"({err.strerror or err}); choose another output folder"
        ) from None


def _report_error(message: str) -> None:
    """One line on stderr, and in ``training.log`` when it is open."""
    print(f"error: {message}", file=sys.stderr)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(
                logging.LogRecord("otface", logging.ERROR, "", 0, "error: %s", (message,), None)
            )


def _this_runs_checkpoint(output: str) -> str:
    """Which checkpoint this run can resume from, with its step: the last one it wrote or
    resumed from. A checkpoint in the folder that this run did not write (an earlier run's)
    is named as such, never offered as this run's."""
    if RUN.last_checkpoint is not None:
        step = RUN.last_checkpoint_step
        at = f" (global step {step})" if step is not None else ""
        return f"this run's last complete checkpoint is {RUN.last_checkpoint}{at}"
    other = checkpoint_path(output, 0)
    if os.path.isfile(other):
        return (
            f"this run wrote no checkpoint; {other} is an earlier run's, and resume = True "
            "would continue that run, not this one"
        )
    return f"this run wrote no checkpoint in {output}"


def _at_step() -> str:
    return f" at global step {RUN.global_step}" if RUN.global_step is not None else ""


def _interrupted_message(output: str, signal_name: str) -> str:
    return f"interrupted ({signal_name}){_at_step()}; {_this_runs_checkpoint(output)}"


# gloo reports a peer that died mid-collective as a plain RuntimeError naming its transport.
_LOST_PEER_MARKERS = ("/gloo/transport/", "Connection closed by peer", "Connection reset by peer")


def _lost_peer(err: RuntimeError) -> bool:
    """Whether ``err`` is a collective that failed because another rank died or went silent
    (torch's ``DistError`` family, or gloo's transport errors)."""
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(err, dist_error):
        return True
    return any(marker in str(err) for marker in _LOST_PEER_MARKERS)


def _lost_peer_message(err: RuntimeError, output: str, env) -> str:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    rank = f"rank {env.rank}" if env is not None else "this rank"
    resume = _this_runs_checkpoint(output)
    if RUN.last_checkpoint is not None:
        resume += (
            "; restart the job with resume = True (on any number of ranks: Partial FC's "
            "centres are resharded)"
        )
    return (
        f"{rank}: a collective failed{_at_step()} because another rank of the job died or "
        f"stopped answering ({type(err).__name__}: {first}); {resume}"
    )
