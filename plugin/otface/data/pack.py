"""Packs an image folder into an InsightFace ``.rec`` training set (the im2rec job, no mxnet).

Usage::

    python -m otface.data.pack IMAGE_DIR OUT_DIR

``IMAGE_DIR`` holds one sub-folder per identity; labels follow the sorted sub-folder names.
JPEG and PNG files are stored byte for byte; other formats are re-encoded as PNG (lossless).
``OUT_DIR`` receives ``train.rec``, ``train.idx`` and ``property`` (header-0 identity ranges,
as in MS1M / Glint360K), and ``classes.txt`` (one sub-folder name per label).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np

from otface.data.datasets import scan_image_folder
from otface.data.rec_writer import WrittenRec, write_rec

__all__ = ["pack_image_folder", "main"]


def _is_jpeg_or_png(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff" or data[:8] == b"\x89PNG\r\n\x1a\n"


def _encoded(path: Path) -> bytes:
    data = path.read_bytes()
    if _is_jpeg_or_png(data):
        return data
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR) if data else None
    if img is None:
        raise ValueError(f"{path}: not a decodable image")
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise ValueError(f"{path}: could not be re-encoded as PNG")
    return buf.tobytes()


def pack_image_folder(image_dir: str | os.PathLike, out_dir: str | os.PathLike) -> WrittenRec:
    """Writes ``out_dir/train.{rec,idx}``, ``property`` and ``classes.txt`` from ``image_dir``.

    Raises:
        FileNotFoundError: ``image_dir`` is missing or holds no images.
        ValueError: a file is not a decodable image (named).
    """
    paths, labels, classes = scan_image_folder(image_dir)

    def samples() -> Iterator[tuple[int, bytes]]:
        for path, label in zip(paths, labels):
            yield int(label), _encoded(path)

    written = write_rec(out_dir, samples())
    tmp = Path(out_dir) / f"classes.txt.tmp-{os.getpid()}"
    tmp.write_text("".join(f"{name}\n" for name in classes), encoding="utf-8")
    os.replace(tmp, Path(out_dir) / "classes.txt")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m otface.data.pack",
        description="Pack an image folder (one sub-folder per identity) into train.rec/train.idx.",
    )
    parser.add_argument("image_dir", help="folder with one sub-folder of images per identity")
    parser.add_argument("out_dir", help="output folder for train.rec, train.idx, property")
    args = parser.parse_args(argv)
    try:
        written = pack_image_folder(args.image_dir, args.out_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {written.num_image} images of {written.num_classes} identities to "
        f"{written.root / 'train.rec'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
