"""IJB-B / IJB-C meta files in InsightFace's release layout, checked line by line.

Layout under the data folder (``T`` is the target in lower case: ``ijbb``, ``ijbc``, ...)::

    meta/T_face_tid_mid.txt        IMAGE TEMPLATE_ID MEDIA_ID           one line per face
    meta/T_template_pair_label.txt TEMPLATE_1 TEMPLATE_2 LABEL(0|1)      one line per pair
    meta/T_name_5pts_score.txt     IMAGE X1 Y1 ... X5 Y5 FACENESS        one line per face
    loose_crop/IMAGE                                                     the face images

Line ``i`` of the two per-face files describes the same face. 1:N identification adds three
comma-separated lists with a header line, ``TEMPLATE_ID,SUBJECT_ID,...`` per row (one row per
image in the real releases)::

    meta/T_1N_gallery_G1.csv, meta/T_1N_gallery_G2.csv   the two galleries (IJB-B: _S1, _S2)
    meta/T_1N_probe_mixed.csv                            the probe templates
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import List, NamedTuple, Union

import numpy as np

__all__ = [
    "IJBLayoutError",
    "IJBLayout",
    "IJBMeta",
    "IJB1NMeta",
    "ijb_layout",
    "ijb_1n_files",
    "read_ijb_meta",
    "read_ijb_1n_meta",
]

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


class IJB1NMeta(NamedTuple):
    """1:N identification lists of one target (templates are unique, sorted within each list).

    Attributes:
        galleries: the two gallery lists, e.g. ``("G1", "G2")``; each item is
            ``(name, templates (T,) int64, subjects (T,) int64)``.
        probe_templates: ``(P,)`` int64 probe template ids (sorted).
        probe_subjects: ``(P,)`` int64 subject of each probe template.
        files: the three CSV files read, gallery 1, gallery 2, probes.
    """

    galleries: List[tuple]
    probe_templates: np.ndarray
    probe_subjects: np.ndarray
    files: List[Path]


#: Gallery list suffixes InsightFace's ``ijb_1n.py`` reads: IJB-C's G1/G2, IJB-B's S1/S2.
GALLERY_NAMES = (("G1", "G2"), ("S1", "S2"))


def ijb_1n_files(root: PathLike, target: str) -> List[Path]:
    """The gallery 1, gallery 2 and mixed-probe CSVs of ``target`` under ``root/meta``.

    IJB-C names its galleries ``G1``/``G2`` and IJB-B ``S1``/``S2``; whichever pair exists is
    used (IJBB prefers S1/S2, any other target G1/G2). A missing file raises
    :class:`IJBLayoutError` naming it.
    """
    meta = Path(root) / "meta"
    prefix = target.lower()
    order = GALLERY_NAMES[::-1] if prefix == "ijbb" else GALLERY_NAMES
    probe = meta / f"{prefix}_1N_probe_mixed.csv"
    for names in order:
        galleries = [meta / f"{prefix}_1N_gallery_{n}.csv" for n in names]
        if all(p.is_file() for p in galleries):
            break
    else:
        names = order[0]
        galleries = [meta / f"{prefix}_1N_gallery_{n}.csv" for n in names]
        missing = next(p for p in galleries if not p.is_file())
        raise IJBLayoutError(
            f"missing {missing}: 1:N identification needs {galleries[0].name}, "
            f"{galleries[1].name} and {probe.name} in {meta}"
        )
    if not probe.is_file():
        raise IJBLayoutError(f"missing {probe}: 1:N identification needs the mixed probe list")
    return [*galleries, probe]


def _read_template_subjects(path: Path) -> tuple:
    """Unique ``(templates, subjects)`` of a ``TEMPLATE_ID,SUBJECT_ID,...`` CSV with a header.

    Real lists have one row per image, so a template repeats; all its rows must name the same
    subject.
    """
    subject_of: dict = {}
    with open(path, encoding="utf-8") as f:
        header = f.readline()
        if not header.strip():
            raise IJBLayoutError(f"{path} is empty (expected a header line, then rows)")
        for lineno, line in enumerate(f, start=2):
            if not line.strip():
                continue
            fields = line.split(",")
            if len(fields) < 2:
                raise _bad_line(path, lineno, line, "expected TEMPLATE_ID,SUBJECT_ID,...")
            try:
                template, subject = int(fields[0]), int(fields[1])
            except ValueError:
                raise _bad_line(
                    path, lineno, line, "non-integer TEMPLATE_ID or SUBJECT_ID"
                ) from None
            known = subject_of.setdefault(template, subject)
            if known != subject:
                raise _bad_line(
                    path, lineno, line, f"template {template} was listed with subject {known}"
                )
    if not subject_of:
        raise IJBLayoutError(f"{path} lists no templates")
    templates = np.asarray(sorted(subject_of), np.int64)
    return templates, np.asarray([subject_of[t] for t in templates.tolist()], np.int64)


def read_ijb_1n_meta(root: PathLike, target: str, known_templates: np.ndarray) -> IJB1NMeta:
    """Read and cross-check a target's 1:N lists (see :func:`ijb_1n_files`).

    Args:
        known_templates: template ids that have faces (from ``*_face_tid_mid.txt``); a listed
            template outside it is an error naming the file.

    Raises:
        IJBLayoutError: a missing or malformed file, a template without faces, a template in
            both galleries, or a subject with more than one gallery template (every subject is
            enrolled once, as InsightFace's evaluation requires).
    """
    files = ijb_1n_files(root, target)
    lists = [_read_template_subjects(p) for p in files]
    known = np.asarray(known_templates)
    for path, (templates, _) in zip(files, lists):
        unknown = templates[~np.isin(templates, known)]
        if len(unknown):
            raise IJBLayoutError(
                f"{path}: template {int(unknown[0])} has no face in the face list "
                f"({len(unknown)} such templates)"
            )
    (t1, s1), (t2, s2) = lists[0], lists[1]
    both = np.intersect1d(t1, t2)
    if len(both):
        raise IJBLayoutError(
            f"template {int(both[0])} is in both {files[0].name} and {files[1].name}"
        )
    subjects = np.concatenate([s1, s2])
    uniq, counts = np.unique(subjects, return_counts=True)
    if (counts > 1).any():
        subject = int(uniq[counts > 1][0])
        raise IJBLayoutError(
            f"subject {subject} has {int(counts[uniq == subject][0])} gallery templates in "
            f"{files[0].name} + {files[1].name}; 1:N scoring needs exactly one per subject"
        )
    names = [p.stem.rsplit("_", 1)[-1] for p in files[:2]]
    return IJB1NMeta(
        galleries=[(names[0], t1, s1), (names[1], t2, s2)],
        probe_templates=lists[2][0],
        probe_subjects=lists[2][1],
        files=files,
    )
