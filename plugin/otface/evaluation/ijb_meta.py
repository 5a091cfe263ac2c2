"""IJB-B / IJB-C 1:1 meta files in InsightFace's release layout, checked line by line.

Layout under the data folder (``T`` is the target in lower case: ``ijbb``, ``ijbc``, ...)::

    meta/T_face_tid_mid.txt        IMAGE TEMPLATE_ID MEDIA_ID           one line per face
    meta/T_template_pair_label.txt TEMPLATE_1 TEMPLATE_2 LABEL(0|1)      one line per pair
    meta/T_name_5pts_score.txt     IMAGE X1 Y1 ... X5 Y5 FACENESS        one line per face
    loose_crop/IMAGE                                                     the face images

Line ``i`` of the two per-face files describes the same face.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import List, NamedTuple, Union

import numpy as np

__all__ = ["IJBLayoutError", "IJBLayout", "IJBMeta", "ijb_layout", "read_ijb_meta"]

PathLike = Union[str, Path]


class IJBLayoutError(ValueError):
    """The IJB data folder is missing a file or holds a malformed line."""


class IJBLayout(NamedTuple):
    """Paths of one IJB target's files."""

    face_tid_mid: Path
    template_pair_label: Path
    name_5pts_score: Path
    image_dir: Path


class IJBMeta(NamedTuple):
    """Parsed meta data of one target (N faces, P template pairs).

    Attributes:
        image_names: N image file names, relative to ``image_dir``.
        landmarks: ``(N, 5, 2)`` float32 five-point landmarks (x, y) in the loose crops.
        faceness: ``(N,)`` float32 detector scores.
        templates: ``(N,)`` int64 template id of each face.
        medias: ``(N,)`` int64 media (photo / video) id of each face.
        pair_templates: ``(P, 2)`` int64 template ids of each pair.
        pair_labels: ``(P,)`` int64, 1 for genuine and 0 for impostor pairs.
        image_dir: folder of the face images (``loose_crop``).
    """

    image_names: List[str]
    landmarks: np.ndarray
    faceness: np.ndarray
    templates: np.ndarray
    medias: np.ndarray
    pair_templates: np.ndarray
    pair_labels: np.ndarray
    image_dir: Path


def ijb_layout(root: PathLike, target: str) -> IJBLayout:
    """Locate a target's files under ``root``; a missing one raises :class:`IJBLayoutError`."""
    root = Path(root)
    prefix = target.lower()
    meta = root / "meta"
    layout = IJBLayout(
        face_tid_mid=meta / f"{prefix}_face_tid_mid.txt",
        template_pair_label=meta / f"{prefix}_template_pair_label.txt",
        name_5pts_score=meta / f"{prefix}_name_5pts_score.txt",
        image_dir=root / "loose_crop",
    )
    if not root.is_dir():
        raise IJBLayoutError(f"IJB data folder {root} does not exist")
    if not meta.is_dir():
        raise IJBLayoutError(f"{root} has no meta/ folder (expected InsightFace's IJB layout)")
    for path in layout[:3]:
        if not path.is_file():
            found = sorted(
                p.name[: -len("_face_tid_mid.txt")] for p in meta.glob("*_face_tid_mid.txt")
            )
            raise IJBLayoutError(
                f"missing {path} for target {target!r}; targets found in {meta}: {found or 'none'}"
            )
    if not layout.image_dir.is_dir():
        raise IJBLayoutError(f"{root} has no loose_crop/ folder with the face images")
    return layout


def _bad_line(path: Path, lineno: int, line: str, why: str) -> IJBLayoutError:
    return IJBLayoutError(f"{path} line {lineno}: {why}; got {line.strip()[:120]!r}")


def _read_faces(layout: IJBLayout):
    names, landmarks, scores = [], [], []
    with open(layout.name_5pts_score, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                raise _bad_line(layout.name_5pts_score, lineno, line, "empty line")
            if len(fields) != 12:
                raise _bad_line(
                    layout.name_5pts_score, lineno, line, "expected IMAGE, 10 coordinates, SCORE"
                )
            try:
                values = [float(v) for v in fields[1:]]
            except ValueError:
                raise _bad_line(layout.name_5pts_score, lineno, line, "non-numeric value") from None
            names.append(fields[0])
            landmarks.append(values[:10])
            scores.append(values[10])
    templates, medias = [], []
    with open(layout.face_tid_mid, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if len(fields) != 3 or not (fields[1].lstrip("-").isdigit() and fields[2].isdigit()):
                raise _bad_line(
                    layout.face_tid_mid, lineno, line, "expected IMAGE TEMPLATE_ID MEDIA_ID"
                )
            if lineno > len(names):
                raise _bad_line(
                    layout.face_tid_mid,
                    lineno,
                    line,
                    f"{layout.name_5pts_score.name} has only {len(names)} lines",
                )
            if fields[0] != names[lineno - 1]:
                raise _bad_line(
                    layout.face_tid_mid,
                    lineno,
                    line,
                    f"image differs from line {lineno} of {layout.name_5pts_score.name} "
                    f"({names[lineno - 1]!r})",
                )
            templates.append(int(fields[1]))
            medias.append(int(fields[2]))
    if len(templates) != len(names):
        raise IJBLayoutError(
            f"{layout.face_tid_mid} has {len(templates)} lines but {layout.name_5pts_score} has "
            f"{len(names)}; they must list the same faces in the same order"
        )
    if not names:
        raise IJBLayoutError(f"{layout.name_5pts_score} lists no faces")
    return (
        names,
        np.asarray(landmarks, np.float32).reshape(-1, 5, 2),
        np.asarray(scores, np.float32),
        np.asarray(templates, np.int64),
        np.asarray(medias, np.int64),
    )


def _scan_pairs(path: Path) -> np.ndarray:
    """Slow, line-numbered parse of a pair file; used to explain a failed fast parse."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if len(fields) != 3:
                raise _bad_line(path, lineno, line, "expected TEMPLATE_1 TEMPLATE_2 LABEL")
            try:
                rows.append([int(v) for v in fields])
            except ValueError:
                raise _bad_line(path, lineno, line, "non-integer value") from None
    return np.asarray(rows, np.int64).reshape(-1, 3)


def _read_pairs(path: Path) -> np.ndarray:
    # IJB-C has 15.7 M pairs: parse in C, fall back to the line scanner on any trouble.
    text = path.read_text(encoding="utf-8")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            values = np.fromstring(text, dtype=np.int64, sep=" ")
        n_lines = text.count("\n") + (0 if text.endswith("\n") else 1)
        if values.size != 3 * n_lines:
            raise ValueError("field count")
        return values.reshape(-1, 3)
    except (ValueError, DeprecationWarning):
        return _scan_pairs(path)


def read_ijb_meta(root: PathLike, target: str) -> IJBMeta:
    """Read and cross-check a target's meta files (see the module docstring for the layout)."""
    layout = ijb_layout(root, target)
    names, landmarks, faceness, templates, medias = _read_faces(layout)
    pairs = _read_pairs(layout.template_pair_label)
    if len(pairs) == 0:
        raise IJBLayoutError(f"{layout.template_pair_label} lists no pairs")
    bad_label = np.flatnonzero((pairs[:, 2] != 0) & (pairs[:, 2] != 1))
    if len(bad_label):
        lineno = int(bad_label[0]) + 1
        raise IJBLayoutError(
            f"{layout.template_pair_label} line {lineno}: label must be 0 or 1, "
            f"got {int(pairs[bad_label[0], 2])}"
        )
    known = np.unique(templates)
    unknown = ~np.isin(pairs[:, :2], known)
    if unknown.any():
        row, col = np.argwhere(unknown)[0]
        raise IJBLayoutError(
            f"{layout.template_pair_label} line {row + 1}: template {int(pairs[row, col])} has "
            f"no face in {layout.face_tid_mid.name}"
        )
    return IJBMeta(
        image_names=names,
        landmarks=landmarks,
        faceness=faceness,
        templates=templates,
        medias=medias,
        pair_templates=pairs[:, :2].copy(),
        pair_labels=pairs[:, 2].copy(),
        image_dir=layout.image_dir,
    )
