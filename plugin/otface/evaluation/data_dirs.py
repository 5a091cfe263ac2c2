"""Where the evaluation command lines find their data: a folder, or the embedded demo set.

``--data demo`` names the embedded demo data (:func:`otface.demo.ensure_demo`, in
``$OTFACE_CACHE`` or ``~/.cache/otface``, generated on first use), as ``rec = "demo"`` does in a
training config; a folder that happens to be called ``demo`` is passed as ``./demo``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Union

__all__ = ["DEMO_DATA", "DEMO_IJB_TARGET", "is_demo", "resolve_data_dir"]

logger = logging.getLogger(__name__)
PathLike = Union[str, Path]

#: The ``--data`` value that names the embedded demo data.
DEMO_DATA = "demo"
#: The IJB target (meta file prefix) of the demo's ``ijb/`` folder.
DEMO_IJB_TARGET = "demo"


def is_demo(data: PathLike) -> bool:
    """True when ``data`` is the keyword :data:`DEMO_DATA` (not a path such as ``./demo``)."""
    return isinstance(data, str) and data == DEMO_DATA


def resolve_data_dir(data: PathLike, *, subdir: str = "") -> Path:
    """The folder that ``--data`` names.

    Args:
        data: a folder, or :data:`DEMO_DATA` for the embedded demo set (built on first use).
        subdir: for the demo set, the part inside its folder (``"ijb"`` for the IJB layout).

    Raises:
        FileNotFoundError: ``data`` is neither the demo keyword nor an existing folder.
    """
    if is_demo(data):
        from otface.demo.generate import ensure_demo

        folder = ensure_demo() / subdir if subdir else ensure_demo()
        logger.info("demo data: %s", folder)
        return folder
    folder = Path(data).expanduser()
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(
            f"--data {folder} {what} (pass a data folder, or {DEMO_DATA!r} for the embedded "
            "demo data)"
        )
    return folder
