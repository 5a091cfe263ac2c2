"""The command-line run: load the config, join the process group, train, and turn every
expected failure into one ``error:`` line and an exit code."""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
from typing import Any, Callable

import torch

from otface.config import ConfigError, load_config
from otface.data.loader import TooManyBadImages
from otface.train.checkpoint import CheckpointError, checkpoint_path
from otface.train.claim import (
    EXISTING_RUN,
    OutputClaim,
    claim_output,
    settle_interrupted_overwrite,
)
from otface.train.distributed import (
    dead_local_peers,
    init_distributed,
    peers_on_other_hosts,
    shutdown_distributed,
)
from otface.train.guard import NonFiniteState, TooManySkippedSteps
from otface.train.log import OutputWriteError, close_log_file, init_logging
from otface.train.loop import BackboneFactory, fit, prepare_data
from otface.train.resume import check_before_start
from otface.train.signals import RUN, Terminated, in_main_thread, raise_terminated
from otface.train.workers import DataLoaderWorkerDied

__all__ = ["main", "resume_command"]


def main(
    config_path: str,
    *,
    load: Callable[[str], Any] = load_config,
    backbone_factory: BackboneFactory | None = None,
    existing: str = "refuse",
    resume: bool = False,
) -> int:
    """Command-line entry: load the config, join the process group, train. Returns exit code.

    ``load`` reads and validates the config (default :func:`otface.config.load_config`);
    ``backbone_factory`` is passed to :func:`fit`. Exit codes: 0 done, 1 a failure during
    training (one ``error:`` line), 2 a bad config or data (one ``error:`` line), 130
    interrupted by Ctrl-C or SIGTERM.

    ``existing``: what a fresh run (``resume = False``) does with an ``output`` folder that
    already holds a run (:mod:`otface.train.claim`): ``"refuse"`` (exit 2, naming the
    choices), ``"overwrite"`` (train there: every file of the old run, its checkpoints, log,
    TensorBoard events, ``model.pt`` and what was exported from it, is set aside, and deleted
    after the new run's first step) or ``"move-aside"`` (rename the old folder to
    ``OUTPUT.YYYYmmdd-HHMMSS`` first; one process only).

    ``resume``: continue the run in ``output`` (``train.py CONFIG --resume``), as the config
    key ``resume = True`` does; it excludes ``existing``.

    A start that fails or is stopped before its first step leaves ``output`` as it was.
    Resuming a run that has finished says so and returns 0.
    """
    if existing not in EXISTING_RUN:
        raise ValueError(f"existing must be one of {EXISTING_RUN}, got {existing!r}")
    if resume and existing != "refuse":
        raise ValueError(f"resume = True excludes existing = {existing!r}")
    try:
        cfg = load(config_path)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if resume:
        cfg.resume = True
    RUN.reset()
    close_log_file()  # an earlier call's log, in this process, is not this run's
    previous_handler = None
    if in_main_thread():
        previous_handler = signal.signal(signal.SIGTERM, raise_terminated)
    env = None
    claim: OutputClaim | None = None
    trained: list[bool] = []

    def first_step() -> None:
        trained.append(True)
        if claim is not None:
            claim.keep()  # the replaced run's files go now, not before

    try:
        env = init_distributed(timeout_s=float(cfg.collective_timeout_s))
        dataset = prepare_data(cfg)  # before anything is written: no empty log on bad data
        if env.rank == 0:  # (the others wait in the next collective)
            settle_interrupted_overwrite(cfg.output)
        if cfg.resume:
            finished = check_before_start(cfg, env)
            if finished is not None:
                print(finished)
                return 0
        claim = claim_output(cfg, env, existing)
        init_logging(env.rank, cfg.output)
        if env.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        fit(
            cfg,
            env,
            backbone_factory=backbone_factory,
            dataset=dataset,
            on_first_step=first_step,
        )
    except ConfigError as err:
        _undo_start(claim, trained)
        _report_error(str(err))
        return 2
    except (
        CheckpointError,
        TooManySkippedSteps,
        NonFiniteState,
        TooManyBadImages,
        OSError,
    ) as err:
        _undo_start(claim, trained)
        _report_error(str(err))
        return 1
    except OutputWriteError as err:  # a full disk under the log or TensorBoard's events
        _undo_start(claim, trained)
        _report_error(f"{err}; {_how_to_continue(cfg, config_path, env)}")
        return 1
    except DataLoaderWorkerDied as err:
        _report_error(f"{err}{_at_step()}; {_how_to_continue(cfg, config_path, env)}")
        return 1
    except RuntimeError as err:
        if not _lost_peer(err):
            raise
        _report_error(_lost_peer_message(err, cfg, config_path, env))
        return 1
    except KeyboardInterrupt as err:
        _undo_start(claim, trained)
        if isinstance(err, Terminated):
            dead = dead_local_peers()
            if dead:  # torchrun's stop after a rank of this node died, not a person's
                _report_error(_dead_rank_message(dead, cfg, config_path, env))
                return 1
        name = "SIGTERM" if isinstance(err, Terminated) else "Ctrl-C"
        message = _interrupted_message(cfg, config_path, env, name)
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


def _undo_start(claim: OutputClaim | None, trained: list[bool]) -> None:
    """A start that ends before its first step: leave the folder as it was."""
    if claim is None or trained:
        return
    close_log_file()
    claim.undo()


def _dead_rank_message(dead: list[tuple[int, int]], cfg, config_path: str, env) -> str:
    rank = f"rank {env.rank}" if env is not None else "this rank"
    who = ", ".join(f"rank {r} (pid {pid})" for r, pid in dead)
    return (
        f"{rank}{_at_step()}: {who} of this machine died, and torchrun is stopping the job; "
        f"{_how_to_continue(cfg, config_path, env)}"
    )


def resume_command(config_path: str, env) -> str:
    """The command that continues this run: the script and config of this one, with
    ``--resume`` (under ``torchrun``, with this node's number of processes; a resume works on
    any number of ranks)."""
    launched = os.path.basename(sys.argv[0]) if sys.argv else ""
    # train.py, or train_otface.py in an arcface_torch checkout; "train.py" for a library call.
    script = (
        sys.argv[0] if launched.startswith("train") and launched.endswith(".py") else "train.py"
    )
    args = [script, config_path, "--resume"]
    if env is None or env.world_size == 1:
        return shlex.join(["python", *args])
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
    command = shlex.join(["torchrun", f"--nproc_per_node={per_node}", *args])
    if per_node != env.world_size:
        command += " (with the job's other torchrun options)"
    return command


def _how_to_continue(cfg, config_path: str, env) -> str:
    """This run's last checkpoint and the command that resumes from it, or why there is
    nothing to resume."""
    if RUN.last_checkpoint is None and cfg.resume:  # stopped before it resumed: nothing changed
        return f"its checkpoints are as they were; to continue: {resume_command(config_path, env)}"
    where = _this_runs_checkpoint(cfg.output)
    if RUN.last_checkpoint is not None:
        return f"{where}; to continue: {resume_command(config_path, env)}"
    return where


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
            f"this run wrote no checkpoint, so it cannot be resumed; {other} is an earlier "
            "run's, which --resume does not continue"
        )
    return f"this run wrote no checkpoint in {output}, so it cannot be resumed"


def _at_step() -> str:
    return f" at global step {RUN.global_step}" if RUN.global_step is not None else ""


def _interrupted_message(cfg, config_path: str, env, signal_name: str) -> str:
    return f"interrupted ({signal_name}){_at_step()}; {_how_to_continue(cfg, config_path, env)}"


# gloo reports a peer that died mid-collective as a plain RuntimeError naming its transport.
_LOST_PEER_MARKERS = ("/gloo/transport/", "Connection closed by peer", "Connection reset by peer")


def _lost_peer(err: RuntimeError) -> bool:
    """Whether ``err`` is a collective that failed because another rank died or went silent
    (torch's ``DistError`` family, or gloo's transport errors)."""
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(err, dist_error):
        return True
    return any(marker in str(err) for marker in _LOST_PEER_MARKERS)


def _lost_peer_message(err: RuntimeError, cfg, config_path: str, env) -> str:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    rank = f"rank {env.rank}" if env is not None else "this rank"
    return (
        f"{rank}: a collective failed{_at_step()} because another rank of the job died or "
        f"stopped answering ({type(err).__name__}: {first}); "
        f"{_how_to_continue(cfg, config_path, env)}"
    )
