"""Writes InsightFace RecordIO training sets (the ``im2rec`` job, without mxnet)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from otface.data.record_format import decode_record, encode_record, pack_payload, unpack_payload

__all__ = ["WrittenRec", "write_rec"]


class WrittenRec(NamedTuple):
    """What :func:`write_rec` wrote: the folder and its image and identity counts."""

    root: Path
    num_image: int
    num_classes: int


def write_rec(
    out_dir: str | os.PathLike,
    samples: Iterable[tuple[int, bytes]],
    *,
    image_size: tuple[int, int] = (112, 112),
    name: str = "train",
) -> WrittenRec:
    """Writes ``NAME.rec`` / ``NAME.idx`` / ``property`` with header-0 identity ranges.

    Images become keys ``1..N`` grouped by label (stable order within a label), identity ``c``
    gets record ``N + 1 + c`` holding its key range, and record 0 holds ``(N + 1, N + 1 + C)``
    with ``C = max(label) + 1`` (labels without images get an empty range). Files are written
    under temporary names and renamed when complete, so an interrupted run leaves no partial
    ``.rec``.

    Args:
        out_dir: destination folder (created if missing).
        samples: ``(label, encoded_image_bytes)`` pairs, labels ``>= 0``, in any order. They are
            streamed to a staging file and then copied in label order (memory holds only
            labels and offsets).
        image_size: ``(height, width)`` written to ``property``.
        name: file stem of the ``.rec`` / ``.idx`` files.

    Returns:
        :class:`WrittenRec`.
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    rec_path, idx_path = root / f"{name}.rec", root / f"{name}.idx"
    tmp = f".tmp-{os.getpid()}"
    tmp_rec, tmp_idx, tmp_prop = (
        Path(f"{p}{tmp}") for p in (rec_path, idx_path, root / "property")
    )
    stage = root / f"{name}.stage{tmp}"
    try:
        labels, offsets = _write_images(stage, samples)
        order = np.argsort(labels, kind="stable")
        with open(tmp_rec, "wb") as out:
            out.write(b"\0" * 40)  # header 0 is fixed-size: written last, in place
            keys_off: list[int] = [0]
            src = stage.open("rb") if order.size else None
            try:
                for new_key, j in enumerate(order, 1):
                    span = int(offsets[j + 1] - offsets[j])
                    src.seek(int(offsets[j]))
                    payload = decode_record(src.read(span), where=f"{stage}, sample {j}")
                    header, image = unpack_payload(payload)
                    keys_off.append(out.tell())
                    out.write(encode_record(pack_payload(header.label, image, id=new_key)))
            finally:
                if src is not None:
                    src.close()
            n_image = int(order.size)
            n_class = int(labels.max()) + 1 if n_image else 0
            if n_image + n_class + 1 > 1 << 24:
                raise ValueError(
                    f"{n_image} images + {n_class} identities exceed the float32 labels of the "
                    "header-0 layout (at most 2**24 records)"
                )
            sorted_labels = labels[order]
            starts = np.searchsorted(sorted_labels, np.arange(n_class), side="left") + 1
            ends = np.searchsorted(sorted_labels, np.arange(n_class), side="right") + 1
            for c in range(n_class):
                keys_off.append(out.tell())
                payload = pack_payload([float(starts[c]), float(ends[c])], b"", id=n_image + 1 + c)
                out.write(encode_record(payload))
            out.seek(0)
            head = encode_record(pack_payload([n_image + 1.0, n_image + n_class + 1.0], b""))
            if len(head) != 40:  # cannot happen for positive counts; keeps the in-place write safe
                raise RuntimeError("header-0 record does not have the expected size")
            out.write(head)
            out.flush()
            os.fsync(out.fileno())
        with open(tmp_idx, "w", encoding="ascii") as f:
            f.writelines(f"{key}\t{off}\n" for key, off in enumerate(keys_off))
        with open(tmp_prop, "w", encoding="ascii") as f:
            f.write(f"{n_class},{int(image_size[0])},{int(image_size[1])}\n")
        os.replace(tmp_rec, rec_path)
        os.replace(tmp_idx, idx_path)
        os.replace(tmp_prop, root / "property")
    finally:
        for p in (stage, tmp_rec, tmp_idx, tmp_prop):
            p.unlink(missing_ok=True)
    return WrittenRec(root, n_image, n_class)


def _write_images(
    stage: Path, samples: Iterable[tuple[int, bytes]]
) -> tuple[np.ndarray, np.ndarray]:
    """Streams samples to a staging file; returns their labels and record offsets (+ end)."""
    labels: list[int] = []
    offsets: list[int] = [0]
    with open(stage, "wb") as f:
        for i, sample in enumerate(samples):
            try:
                label, image = sample
                label = int(label)
            except (TypeError, ValueError):
                raise ValueError(
                    f"sample {i}: expected (label: int, image: bytes), got {type(sample).__name__}"
                ) from None
            if label < 0:
                raise ValueError(f"sample {i}: label must be >= 0, got {label}")
            if not isinstance(image, (bytes, bytearray, memoryview)):
                raise ValueError(f"sample {i}: image must be bytes, got {type(image).__name__}")
            f.write(encode_record(pack_payload(float(label), bytes(image))))
            offsets.append(f.tell())
            labels.append(label)
    return np.asarray(labels, dtype=np.int64), np.asarray(offsets, dtype=np.int64)
