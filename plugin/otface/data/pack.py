"""Packs an image folder into an InsightFace ``.rec`` training set (the im2rec job, no mxnet).

Usage::

    python -m otface.data.pack IMAGE_DIR OUT_DIR [--skip-bad] [--workers N] [--k K]

``IMAGE_DIR`` holds one sub-folder per identity; labels follow the sorted sub-folder names.
Every file is decoded first (in parallel threads, with a progress line): a file that OpenCV
cannot decode (a truncated JPEG, garbage after a valid header) is reported by name, all of them
on a line of its own, and nothing is written, not even ``OUT_DIR``. With ``--skip-bad`` the
others are packed, each left-out file is named on a line and listed in
``OUT_DIR/skipped.txt``; identities left with no image are dropped (labels follow the remaining
sub-folders). 112x112 JPEG and PNG files are stored byte for byte; other formats are
re-encoded as PNG (lossless); images of another size are resized to 112x112 (area averaging
when shrinking) and re-encoded (JPEG quality 95 from a JPEG, else PNG), and reported. The
report ends with the images per identity and the identities with fewer images than the P x K
sampler's ``k`` (``--k``), whose images a batch repeats. ``OUT_DIR`` receives
``train.rec``, ``train.idx`` and ``property`` (header-0 identity ranges, as in MS1M /
Glint360K), and ``classes.txt`` (one sub-folder name per label).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, Optional

import cv2
import numpy as np

from otface.data.datasets import scan_image_folder
from otface.data.rec_writer import WrittenRec, write_rec

__all__ = [
    "BadImages",
    "PackReport",
    "PackResult",
    "check_images",
    "inspect_images",
    "pack_image_folder",
    "main",
]

IMAGE_SIZE = 112  # InsightFace's aligned crops: 112 x 112

_SHOWN = 20  # bad files named in an error message; all of them go to skipped.txt


class BadImages(ValueError):
    """Files of the image folder that are not decodable images (``bad``: path, reason)."""

    def __init__(self, root: Path, bad: list[tuple[Path, str]], total: int) -> None:
        self.bad = bad
        self.total = total
        shown = "; ".join(f"{path.relative_to(root)} ({why})" for path, why in bad[:_SHOWN])
        more = f"; and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
        super().__init__(
            f"{root}: {len(bad)} of {total} files are not decodable images: {shown}{more}. "
            "Nothing was written; remove or replace them, or pass --skip-bad to pack the rest"
        )


class PackReport(NamedTuple):
    """What was packed: images per identity (in label order, with the identities' folder
    names) and the images resized to 112x112, with their original ``(width, height)``."""

    per_identity: np.ndarray
    names: list[str]
    resized: list[tuple[Path, tuple[int, int]]]

    def short_of(self, k: int) -> list[str]:
        """The identities (folder names, in label order) with fewer than ``k`` images."""
        return [self.names[i] for i in np.flatnonzero(self.per_identity < k)]

    def lines(self, k: int) -> list[str]:
        """The report, one line per fact, for ``k`` images per identity in a P x K batch."""
        if k < 1:
            raise ValueError(f"k (images per identity in a batch) must be >= 1, got {k}")
        counts = self.per_identity
        median = float(np.median(counts))
        median_text = f"{int(median)}" if median.is_integer() else f"{median:.1f}"
        out = [
            f"images per identity: min {int(counts.min())}, median {median_text}, "
            f"max {int(counts.max())}"
        ]
        few = self.short_of(k)
        if few:
            shown = ", ".join(few[:5]) + (f" and {len(few) - 5} more" if len(few) > 5 else "")
            out.append(
                f"{len(few)} identities have fewer than {k} images (sampler.k = {k}): the P x K "
                f"sampler repeats their images in a batch ({shown})"
            )
        if self.resized:
            sizes = list(dict.fromkeys(f"{w}x{h}" for _, (w, h) in self.resized))
            shown = ", ".join(sizes[:3]) + (", ..." if len(sizes) > 3 else "")
            line = (
                f"{len(self.resized)} images were not {IMAGE_SIZE}x{IMAGE_SIZE} ({shown}): "
                f"resized to {IMAGE_SIZE}x{IMAGE_SIZE} when packed"
            )
            skewed = sum(1 for _, (w, h) in self.resized if w != h)
            if skewed:
                line += (
                    f"; {skewed} of them not square, so stretched: aligned face crops are square "
                    f"{IMAGE_SIZE}x{IMAGE_SIZE}; see docs/custom_data.md (Unaligned photos) for "
                    "aligning photos"
                )
            out.append(line)
        return out


class PackResult(NamedTuple):
    written: WrittenRec
    skipped: list[tuple[Path, str]]
    report: Optional[PackReport] = None


def _is_jpeg_or_png(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff" or data[:8] == b"\x89PNG\r\n\x1a\n"


def _decode(data: bytes) -> Optional[np.ndarray]:
    if not data:
        return None
    return cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)


def _inspect(path: Path) -> tuple[Optional[str], Optional[tuple[int, int]]]:
    """``(None, (width, height))`` for a decodable image, else ``(why not, None)``."""
    try:
        data = path.read_bytes()
    except OSError as err:
        return f"cannot be read: {err.strerror or err}", None
    if not data:
        return "empty file", None
    img = _decode(data)
    if img is None:
        why = "cannot be decoded" + (" (truncated or damaged)" if _is_jpeg_or_png(data) else "")
        return why, None
    return None, (int(img.shape[1]), int(img.shape[0]))


def inspect_images(
    paths: Sequence[Path], *, workers: int = 0, progress=None
) -> tuple[list[tuple[Path, str]], dict[Path, tuple[int, int]]]:
    """Decode every file once (threads: OpenCV releases the GIL): the bad ones with why, and
    the ``(width, height)`` of every good one.

    ``progress(done, total, bad)`` is called about every two seconds and at the end.
    """
    workers = workers or min(16, os.cpu_count() or 1)
    bad: list[tuple[Path, str]] = []
    sizes: dict[Path, tuple[int, int]] = {}
    last = time.monotonic()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for done, (path, (why, size)) in enumerate(zip(paths, pool.map(_inspect, paths)), 1):
            if why is not None:
                bad.append((path, why))
            else:
                sizes[path] = size
            now = time.monotonic()
            if progress is not None and (now - last >= 2.0 or done == len(paths)):
                progress(done, len(paths), len(bad))
                last = now
    return bad, sizes


def check_images(
    paths: Sequence[Path], *, workers: int = 0, progress=None
) -> list[tuple[Path, str]]:
    """The files that are not decodable images, with why (see :func:`inspect_images`)."""
    return inspect_images(paths, workers=workers, progress=progress)[0]


def _encoded(path: Path, size: tuple[int, int]) -> bytes:
    """The bytes to store for ``path``, whose decoded ``(width, height)`` is ``size``."""
    data = path.read_bytes()
    aligned = size == (IMAGE_SIZE, IMAGE_SIZE)
    if aligned and _is_jpeg_or_png(data):
        return data  # byte for byte
    img = _decode(data)
    if img is None:  # changed since it was checked
        raise ValueError(f"{path}: not a decodable image")
    if img.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        shrink = img.shape[0] * img.shape[1] > IMAGE_SIZE * IMAGE_SIZE
        img = cv2.resize(
            img,
            (IMAGE_SIZE, IMAGE_SIZE),
            interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR,
        )
        if data[:3] == b"\xff\xd8\xff":
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
            if not ok:
                raise ValueError(f"{path}: could not be re-encoded as JPEG")
            return buf.tobytes()
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise ValueError(f"{path}: could not be re-encoded as PNG")
    return buf.tobytes()


def pack_image_folder(
    image_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    skip_bad: bool = False,
    workers: int = 0,
    progress=None,
) -> PackResult:
    """Writes ``out_dir/train.{rec,idx}``, ``property`` and ``classes.txt`` from ``image_dir``
    (and ``skipped.txt`` when ``skip_bad`` left files out).

    Raises:
        FileNotFoundError: ``image_dir`` is missing or holds no images.
        BadImages: files that are not decodable images (all named; nothing written), unless
            ``skip_bad``.
        ValueError: nothing decodable is left to pack.
    """
    root = Path(image_dir)
    paths, labels, classes = scan_image_folder(root)
    bad, sizes = inspect_images(paths, workers=workers, progress=progress)
    if bad and not skip_bad:
        raise BadImages(root, bad, len(paths))
    refused = {path for path, _ in bad}
    keep = [i for i, path in enumerate(paths) if path not in refused]
    if not keep:
        raise ValueError(f"{root}: none of the {len(paths)} files is a decodable image")
    kept_labels = sorted({int(labels[i]) for i in keep})
    relabel = {old: new for new, old in enumerate(kept_labels)}
    per_identity = np.bincount([relabel[int(labels[i])] for i in keep], minlength=len(kept_labels))
    resized = [
        (paths[i], sizes[paths[i]]) for i in keep if sizes[paths[i]] != (IMAGE_SIZE, IMAGE_SIZE)
    ]
    report = PackReport(per_identity, [classes[c] for c in kept_labels], resized)

    def samples() -> Iterator[tuple[int, bytes]]:
        for i in keep:
            yield relabel[int(labels[i])], _encoded(paths[i], sizes[paths[i]])

    out = Path(out_dir)
    created = not out.exists()
    try:
        written = write_rec(out, samples())
        _write_text(out / "classes.txt", "".join(f"{classes[c]}\n" for c in kept_labels))
        if bad:
            _write_text(
                out / "skipped.txt", "".join(f"{p.relative_to(root)}\t{why}\n" for p, why in bad)
            )
    except BaseException:
        if created:  # nothing half-written left behind
            for child in out.glob("*"):
                child.unlink()
            out.rmdir()
        raise
    return PackResult(written, bad, report)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m otface.data.pack",
        description="Pack an image folder (one sub-folder per identity) into train.rec/train.idx.",
    )
    parser.add_argument("image_dir", help="folder with one sub-folder of images per identity")
    parser.add_argument("out_dir", help="output folder for train.rec, train.idx, property")
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="pack the decodable images and list the others in OUT_DIR/skipped.txt",
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="decoding threads (default: CPUs, at most 16)"
    )
    parser.add_argument(
        "--k",
        type=int,
        default=4,
        help="images per identity in a P x K batch (config sampler.k, default 4): identities "
        "with fewer are reported",
    )
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error(f"--k must be >= 1, got {args.k}")

    def progress(done: int, total: int, bad: int) -> None:
        print(f"checked {done}/{total} images ({bad} not decodable)", file=sys.stderr)

    try:
        result = pack_image_folder(
            args.image_dir,
            args.out_dir,
            skip_bad=args.skip_bad,
            workers=args.workers,
            progress=progress,
        )
    except BadImages as e:
        root = Path(args.image_dir)
        for path, why in e.bad:  # one line each, all of them
            print(f"bad image: {path.relative_to(root)}: {why}", file=sys.stderr)
        print(
            f"error: {root}: {len(e.bad)} of {e.total} files are not decodable images (named "
            "above, one per line). Nothing was written; remove or replace them, or pass "
            "--skip-bad to pack the rest",
            file=sys.stderr,
        )
        return 1
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    written = result.written
    print(
        f"wrote {written.num_image} images of {written.num_classes} identities to "
        f"{written.root / 'train.rec'}"
    )
    if result.report is not None:
        for line in result.report.lines(args.k):
            print(line)
    if result.skipped:
        root = Path(args.image_dir)
        for path, why in result.skipped:
            print(f"left out: {path.relative_to(root)}: {why}", file=sys.stderr)
        print(
            f"left out {len(result.skipped)} files that are not decodable images "
            f"(listed in {written.root / 'skipped.txt'})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
