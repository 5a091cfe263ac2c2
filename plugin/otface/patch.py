"""Use OTFace inside an existing arcface_torch checkout, without changing any of its files.

``apply`` adds an overlay of this project's own files to the checkout (``train_otface.py`` and
``configs/*_otface.py`` with the ``*_arcface.py`` configs they build on; the script is shipped
in the source checkout's ``patches/arcface_torch/``, the configs are this project's own) and
records each written file's SHA-256 in ``.otface_patch.json`` there; ``check`` reports whether
that overlay is present and unmodified and whether the checkout is a supported arcface_torch;
``revert`` removes exactly the files ``apply`` wrote (and restores any file a forced ``apply``
displaced)::

    python -m otface.patch apply  /path/to/arcface_torch
    python -m otface.patch check  /path/to/arcface_torch
    python -m otface.patch revert /path/to/arcface_torch [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import NamedTuple

from otface import __version__

__all__ = [
    "MANIFEST",
    "REQUIRED",
    "PatchError",
    "ApplyResult",
    "CheckResult",
    "RevertResult",
    "overlay_dir",
    "overlay_files",
    "apply_overlay",
    "check_overlay",
    "revert_overlay",
    "main",
]

MANIFEST = ".otface_patch.json"
BACKUP_SUFFIX = ".otface-backup"
# Files whose presence makes a directory an arcface_torch checkout we can use.
REQUIRED = ("train_v2.py", "backbones/__init__.py", "configs/base.py", "partial_fc_v2.py")
# SHA-256 of the upstream files the overlay uses, at arcface_torch commit ab27f4d6 (the same at
# today's head). A checkout whose files differ may still work if get_model keeps its signature.
UPSTREAM_COMMIT = "ab27f4d60f855b56e98062abaf35bcde69b27c39"
_UPSTREAM_SHA256 = {
    "backbones/__init__.py": "f8b47b5f06f9f7febc85e02471e756b1576f92f222f432f818c1bfbcedeac176",
    "backbones/iresnet.py": "fb57d145c4c26d8e55680c24fa164541a7222ccdefa3a1716c054ff4c5859753",
    "backbones/mobilefacenet.py": (
        "95a1746ca8c8b88460adf4fb0b113a4a0292481019eb5157df3e1cd9eacb8881"
    ),
    "configs/base.py": "29e6e2471b721d235f50dd8ad517311d7a0e0faf4dcf5550869f3818f7ee7de6",
}


class PatchError(RuntimeError):
    """The overlay cannot be applied, checked or reverted; the message says why and which file."""


class ApplyResult(NamedTuple):
    written: list[str]  # paths (relative to the checkout) written or updated
    unchanged: list[str]  # already present with this version's content
    backed_up: list[str]  # foreign files displaced by --force (kept as NAME.otface-backup)


class CheckResult(NamedTuple):
    ok: bool  # applied, intact, and a usable checkout
    applied: bool
    upstream_match: bool  # the files the overlay uses equal upstream's at UPSTREAM_COMMIT
    messages: list[str]


class RevertResult(NamedTuple):
    removed: list[str]
    restored: list[str]  # foreign files put back from their backups
    missing: list[str]  # recorded in the manifest but already gone


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def overlay_dir() -> Path:
    """``patches/arcface_torch`` of the otface source checkout (editable install)."""
    path = Path(__file__).resolve().parents[2] / "patches" / "arcface_torch"
    if not (path / "train_otface.py").is_file():
        raise PatchError(
            f"overlay sources not found in {str(path)!r}: install otface from its source "
            "checkout with `pip install -e .` (the checkout holds patches/arcface_torch/)"
        )
    return path


# Job configs shared with this project's own train.py: the same files go into the checkout.
# Each *_otface.py twin imports its *_arcface.py (or, for another margin head, its *_adaface.py /
# *_curricularface.py) (``from configs.NAME import config``), which goes with it.
OVERLAY_CONFIGS = (
    "glint360k_r100_arcface.py",
    "glint360k_r100_otface.py",
    "ms1mv3_r100_arcface.py",
    "ms1mv3_r100_otface.py",
    "ms1mv3_r100_adaface.py",
    "ms1mv3_r100_adaface_otface.py",
    "ms1mv3_r100_curricularface.py",
    "ms1mv3_r100_curricularface_otface.py",
    "ms1mv3_r50_arcface.py",
    "ms1mv3_r50_otface.py",
)


def overlay_files() -> dict[str, bytes]:
    """The overlay: checkout-relative POSIX path → content."""
    root = overlay_dir()
    files = {"train_otface.py": (root / "train_otface.py").read_bytes()}
    configs = root.parents[1] / "configs"
    for name in OVERLAY_CONFIGS:
        if not (configs / name).is_file():
            raise PatchError(f"overlay config {str(configs / name)!r} not found")
        files[f"configs/{name}"] = (configs / name).read_bytes()
    return files


def _check_tree(tree: Path) -> None:
    if not tree.is_dir():
        raise PatchError(f"{str(tree)!r} is not a directory (expected an arcface_torch checkout)")
    missing = [rel for rel in REQUIRED if not (tree / rel).is_file()]
    if missing:
        raise PatchError(
            f"{str(tree)!r} is not an arcface_torch checkout: missing {', '.join(missing)} "
            "(pass the recognition/arcface_torch folder of insightface)"
        )
    init = (tree / "backbones/__init__.py").read_text(encoding="utf-8", errors="replace")
    if "def get_model" not in init:
        raise PatchError(f"{tree / 'backbones/__init__.py'}: defines no get_model(name, **kwargs)")


def _read_manifest(tree: Path) -> dict | None:
    path = tree / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
    except (ValueError, KeyError, TypeError) as err:
        raise PatchError(
            f"{path}: unreadable overlay manifest ({err}); remove it by hand"
        ) from None
    manifest.setdefault("backups", {})
    return manifest


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".otface-tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def apply_overlay(tree: str | os.PathLike, *, force: bool = False) -> ApplyResult:
    """Write the overlay into ``tree`` and record it in ``tree/.otface_patch.json``.

    Idempotent. A file of the same name that the overlay did not write (or that the user edited
    since) is refused, before anything is written, unless ``force``: then a foreign file is kept
    as ``NAME.otface-backup`` (``revert`` puts it back) and an edited overlay file is replaced.

    Raises:
        PatchError: not an arcface_torch checkout, or a conflicting file (named).
    """
    tree = Path(tree)
    _check_tree(tree)
    files = overlay_files()
    manifest = _read_manifest(tree) or {"files": {}, "backups": {}}
    recorded, backups = manifest["files"], manifest["backups"]
    conflicts: list[str] = []
    for rel, data in files.items():
        dest = tree / rel
        if not dest.exists() or dest.read_bytes() == data:
            continue
        if rel in recorded and _sha256(dest) == recorded[rel]:
            continue  # ours, from an older otface: updated in place
        why = "edited since apply" if rel in recorded else "not written by otface.patch"
        conflicts.append(f"{rel} ({why})")
        if rel not in recorded and (tree / (rel + BACKUP_SUFFIX)).exists():
            raise PatchError(
                f"{tree}: {rel} is not ours and {rel}{BACKUP_SUFFIX} exists, so it cannot be kept "
                "aside; move one of them away"
            )
    if conflicts and not force:
        raise PatchError(
            f"{tree}: refusing to overwrite {', '.join(conflicts)}; move it away or pass --force"
        )
    written, unchanged, backed_up = [], [], []
    for rel, data in files.items():
        dest = tree / rel
        if dest.exists() and dest.read_bytes() == data:
            unchanged.append(rel)
        else:
            if dest.exists() and rel not in recorded and rel not in backups:
                backup = rel + BACKUP_SUFFIX
                os.replace(dest, tree / backup)
                backups[rel] = backup
                backed_up.append(rel)
            _write_atomic(dest, data)
            written.append(rel)
        recorded[rel] = hashlib.sha256(data).hexdigest()
    manifest.update(
        tool="otface.patch", otface_version=__version__, upstream="arcface_torch", files=recorded
    )
    _write_atomic(tree / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return ApplyResult(written, unchanged, backed_up)


def check_overlay(tree: str | os.PathLike) -> CheckResult:
    """Is the overlay applied and intact in ``tree``, and is ``tree`` a supported checkout?"""
    tree = Path(tree)
    messages: list[str] = []
    try:
        _check_tree(tree)
    except PatchError as err:
        return CheckResult(False, False, False, [str(err)])
    differ = [
        rel
        for rel, sha in _UPSTREAM_SHA256.items()
        if not (tree / rel).is_file() or _sha256(tree / rel) != sha
    ]
    if not differ:
        messages.append(f"arcface_torch: the files used match upstream {UPSTREAM_COMMIT[:8]}")
    else:
        messages.append(
            f"arcface_torch: {', '.join(differ)} missing or different from upstream "
            f"{UPSTREAM_COMMIT[:8]} "
            "(a modified checkout: fine while get_model(name, dropout=, fp16=, num_features=) "
            "builds the network)"
        )
    try:
        manifest = _read_manifest(tree)
    except PatchError as err:
        return CheckResult(False, False, not differ, messages + [str(err)])
    if manifest is None:
        messages.append(f"overlay: not applied (no {MANIFEST})")
        return CheckResult(False, False, not differ, messages)
    ok = True
    for rel, sha in sorted(manifest["files"].items()):
        path = tree / rel
        if not path.is_file():
            messages.append(f"overlay: {rel} is missing")
            ok = False
        elif _sha256(path) != sha:
            messages.append(f"overlay: {rel} was modified since apply")
            ok = False
    try:
        current = {rel: hashlib.sha256(data).hexdigest() for rel, data in overlay_files().items()}
    except PatchError as err:
        messages.append(f"overlay: cannot compare with this otface ({err})")
    else:
        if current != manifest["files"]:
            messages.append(
                f"overlay: written by otface {manifest.get('otface_version', '?')}, this is "
                f"{__version__} with different files; run `python -m otface.patch apply` again"
            )
    if ok:
        messages.append(f"overlay: applied and intact ({len(manifest['files'])} files)")
    return CheckResult(ok, True, not differ, messages)


def revert_overlay(tree: str | os.PathLike, *, force: bool = False) -> RevertResult:
    """Remove the files ``apply`` wrote and its manifest; put back displaced files.

    Raises:
        PatchError: no manifest, or files edited since apply (named) and not ``force``.
    """
    tree = Path(tree)
    manifest = _read_manifest(tree)
    if manifest is None:
        raise PatchError(f"{tree}: the overlay is not applied (no {MANIFEST}); nothing to revert")
    files, backups = manifest["files"], manifest["backups"]
    edited = [
        rel for rel, sha in files.items() if (tree / rel).is_file() and _sha256(tree / rel) != sha
    ]
    if edited and not force:
        raise PatchError(
            f"{tree}: {', '.join(sorted(edited))} changed since apply; refusing to delete "
            "(copy your changes elsewhere, or pass --force to delete anyway)"
        )
    removed, restored, missing = [], [], []
    for rel in sorted(files):
        path = tree / rel
        if path.is_file():
            path.unlink()
            removed.append(rel)
        else:
            missing.append(rel)
        backup = backups.get(rel)
        if backup and (tree / backup).is_file():
            os.replace(tree / backup, path)
            restored.append(rel)
    (tree / MANIFEST).unlink()
    return RevertResult(removed, restored, missing)


def main(argv: list[str] | None = None) -> int:
    """``python -m otface.patch {apply,check,revert} DIR [--force]``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m otface.patch",
        description="Add OTFace to an arcface_torch checkout as an overlay of new files.",
    )
    parser.add_argument("action", choices=("apply", "check", "revert"))
    parser.add_argument("tree", help="the arcface_torch folder (insightface/recognition/...)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="apply: displace conflicting files (kept as NAME.otface-backup); "
        "revert: delete overlay files even if edited",
    )
    args = parser.parse_args(argv)
    try:
        if args.action == "apply":
            res = apply_overlay(args.tree, force=args.force)
            for rel in res.backed_up:
                print(f"kept your {rel} as {rel}{BACKUP_SUFFIX} (revert puts it back)")
            for rel in res.written:
                print(f"wrote {rel}")
            if not res.written:
                print(f"already applied ({len(res.unchanged)} files unchanged)")
            print(f"train: cd {args.tree} && python train_otface.py configs/ms1mv3_r100_otface")
            return 0
        if args.action == "revert":
            res = revert_overlay(args.tree, force=args.force)
            for rel in res.removed:
                print(f"removed {rel}")
            for rel in res.restored:
                print(f"restored your {rel}")
            for rel in res.missing:
                print(f"{rel} was already gone")
            return 0
    except PatchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    res = check_overlay(args.tree)
    for line in res.messages:
        print(line)
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
