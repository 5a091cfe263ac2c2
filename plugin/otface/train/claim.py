"""A start's hold on its ``output`` folder: refuse, replace or move aside a run already there,
and undo what the start wrote if it fails before its first step.

A folder *holds a run* once a run has trained in it: it has ``model.pt``, a training checkpoint,
or a ``training.log`` with a step line. ``--overwrite`` sets the old run's files aside in
``output/.replaced`` when it starts and deletes them after the new run's first step; a start
that fails before that step puts them back and removes what it wrote itself (its log lines,
its TensorBoard files, the folder when it made it), so that the folder is as it was and the
corrected command runs without a flag. One killed outright in that window leaves
``output/.replaced``; the next start puts the old run back (or, if the new run had trained,
finishes deleting it).
"""

from __future__ import annotations

import os
import re
import shutil
import time

import torch

from otface.config import ConfigError
from otface.train.identity import LOG_NAME

__all__ = [
    "EXISTING_RUN",
    "OutputClaim",
    "claim_output",
    "holds_run",
    "settle_interrupted_overwrite",
]

EXISTING_RUN = ("refuse", "overwrite", "move-aside")

_TENSORBOARD = "tensorboard"
_ASIDE = ".replaced"
# A run's own files. Checkpoints with their rotation partners, sidecars and quarantined copies;
# what otface.export made from model.pt.
_CHECKPOINT_RE = re.compile(r"checkpoint_gpu_\d+(\.prev)?\.pt(\.corrupt)?(\.sha256)?")
_RUN_FILES = (
    "model.pt",
    LOG_NAME,
    _TENSORBOARD,
    "model.onnx",
    "model.onnx.source.json",
    "package",
)
_STEP_LINE = "Global Step:"


def _run_files(output: str) -> list[str]:
    names = set(os.listdir(output)) if os.path.isdir(output) else set()
    return sorted(n for n in names if n in _RUN_FILES or _CHECKPOINT_RE.fullmatch(n))


def _log_has_trained(path: str) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return any(_STEP_LINE in line for line in f)
    except OSError:
        return False


def holds_run(output: str) -> list[str]:
    """The files that make ``output`` hold a run (empty when it holds none): ``model.pt``,
    training checkpoints, and ``training.log`` once it records a step."""
    found = []
    for name in _run_files(output):
        if name == "model.pt" or (_CHECKPOINT_RE.fullmatch(name) and ".sha256" not in name):
            found.append(name)
        elif name == LOG_NAME and _log_has_trained(os.path.join(output, name)):
            found.append(name)
    return found


class OutputClaim:
    """What this start did to ``output`` (rank 0's view), to undo it or make it final.

    Args:
        output: the run's output folder.
        resume: whether this start resumes the run there.
    """

    def __init__(self, output: str, *, resume: bool) -> None:
        self.output = output
        self.resume = resume
        self.made_folder = not os.path.exists(output)
        log = os.path.join(output, LOG_NAME)
        self.log_bytes = os.path.getsize(log) if os.path.isfile(log) else None
        self.tensorboard_before = _walk(os.path.join(output, _TENSORBOARD))
        self.aside: str | None = None
        self.moved_to: str | None = None  # --move-aside: where the old folder went

    def set_aside(self) -> list[str]:
        """``--overwrite``: move the old run's files into ``output/.replaced`` (deleted by
        :meth:`keep`); returns their names."""
        names = _run_files(self.output)
        if not names:
            return names
        self.aside = os.path.join(self.output, _ASIDE)
        if os.path.isdir(self.aside):  # left by a start killed before its first step
            shutil.rmtree(self.aside)
        os.makedirs(self.aside)
        for name in names:
            os.rename(os.path.join(self.output, name), os.path.join(self.aside, name))
        # What this start will find of the folder is the emptied one.
        self.log_bytes = None
        self.tensorboard_before = set()
        return names

    def keep(self) -> None:
        """The run has trained a step: the replaced run's files go for good."""
        if self.aside is not None:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None

    def undo(self) -> None:
        """The start failed before its first step: remove what it wrote (close the log file
        first) and put back what it set aside."""
        if self.made_folder:
            shutil.rmtree(self.output, ignore_errors=True)
            if self.moved_to is not None and not os.path.exists(self.output):
                os.rename(self.moved_to, self.output)
            return
        log = os.path.join(self.output, LOG_NAME)
        if self.log_bytes is None:
            _unlink(log)
        elif os.path.isfile(log):
            os.truncate(log, self.log_bytes)
        board = os.path.join(self.output, _TENSORBOARD)
        for path in sorted(_walk(board) - self.tensorboard_before, reverse=True):
            full = os.path.join(board, path)
            if os.path.isdir(full):
                _rmdir(full)
            else:
                _unlink(full)
        if not self.tensorboard_before:
            _rmdir(board)
        if self.aside is not None:
            for name in os.listdir(self.aside):
                os.replace(os.path.join(self.aside, name), os.path.join(self.output, name))
            _rmdir(self.aside)
            self.aside = None


def claim_output(cfg, env, existing: str) -> OutputClaim | None:
    """Take ``cfg.output`` for this start; rank 0 returns its :class:`OutputClaim`.

    A fresh start (``resume = False``) into a folder that holds a run (:func:`holds_run`):
    ``"refuse"`` raises :class:`ConfigError` naming the choices; ``"overwrite"`` sets the old
    run's files aside (deleted after the first step); ``"move-aside"`` renames the folder to
    ``OUTPUT.YYYYmmdd-HHMMSS`` (one process only). Nothing is written before this returns, and
    only the folder (and the write test in it) afterwards.
    """
    if existing not in EXISTING_RUN:
        raise ValueError(f"existing must be one of {EXISTING_RUN}, got {existing!r}")
    output = cfg.output
    found: list[str] = []
    # Rank 0 looks, before it writes anything, and tells the others (which would otherwise
    # see the log it is about to start).
    if env.rank == 0 and not cfg.resume:
        found = holds_run(output)
    if env.distributed:
        shared = [found]
        torch.distributed.broadcast_object_list(shared, src=0)
        found = shared[0]
    if found and existing == "refuse":
        raise ConfigError(
            f"key 'output' = {output!r} already holds a run ({', '.join(found)}): run train.py "
            "with --resume to continue it, --overwrite to train there replacing it, or "
            f"--move-aside to keep it as {os.path.basename(os.path.normpath(output))}.<date>; "
            "or choose another output (resume = True in the config is the same as --resume)"
        )
    if found and existing == "move-aside":
        if env.world_size > 1:
            raise ConfigError("--move-aside is for one process; with torchrun use --overwrite")
        aside = f"{os.path.normpath(output)}.{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(output, aside)
        _note_moved_log(output, aside)
        print(f"moved the previous run in {output} aside to {aside}")
    claim = OutputClaim(output, resume=cfg.resume) if env.rank == 0 else None
    if claim is not None and found and existing == "move-aside":
        claim.moved_to = aside
    if claim is not None and found and existing == "overwrite":
        claim.set_aside()
    _check_output_writable(output)
    return claim


def _note_moved_log(output: str, aside: str) -> None:
    """Ends the moved run's log with where it went: the lines above name the old folder."""
    log = os.path.join(aside, LOG_NAME)
    if not os.path.isfile(log):
        return
    try:
        with open(log, "a", encoding="utf-8") as f:
            f.write(
                f"==== moved aside {time.strftime('%Y-%m-%d %H:%M:%S')}: this run's files are "
                f"now in {aside}; the paths above name {output}, where a new run started ====\n"
            )
    except OSError:  # a read-only or full disk: the move itself has happened
        pass


def settle_interrupted_overwrite(output: str) -> None:
    """An ``--overwrite`` killed (SIGKILL, a power cut) before :meth:`OutputClaim.keep` or
    :meth:`OutputClaim.undo` ran leaves ``output/.replaced``: if the new run never trained, the
    old run is put back; if it did, the old run's files are deleted as planned. Rank 0 calls it
    before anything looks at the folder."""
    aside = os.path.join(output, _ASIDE)
    if not os.path.isdir(aside):
        return
    if holds_run(output):
        shutil.rmtree(aside, ignore_errors=True)
        return
    for name in os.listdir(aside):
        target = os.path.join(output, name)
        if os.path.isdir(target):  # what the interrupted start wrote in its place
            shutil.rmtree(target)
        elif os.path.exists(target):
            os.unlink(target)
        os.replace(os.path.join(aside, name), target)
    _rmdir(aside)
    print(
        f"put back the run in {output} that an --overwrite killed before its first step set aside"
    )


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


def _walk(root: str) -> set[str]:
    found: set[str] = set()
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            found.add(os.path.relpath(os.path.join(folder, name), root))
    return found


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _rmdir(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:  # not empty, or gone
        pass
