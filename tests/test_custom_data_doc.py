"""docs/custom_data.md, run as written: its ```bash commands in order and the config file it
shows, on a small folder of rendered demo faces. The test fails when the document and the code
drift apart."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _jobs import configs_folder

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "custom_data.md"
# The document fine-tunes mbf, upstream's smallest network, which is still 9 s a training step
# at batch 64 on one CPU thread. The walkthrough swaps in the demo network r18_lite (0.4 s a
# step) in the two places the document names its network, the config's `network` and the first
# evaluation's `--network`, and checks that they are the only ones: every other word of the
# commands and the config is run as written.
DOC_NETWORK, NETWORK = "mbf", "r18_lite"


def _blocks(text: str):
    """(kind, body, file) for every fenced block; ``file`` from a ``<!-- file: X -->`` line
    just before it."""
    pattern = re.compile(r"(?:<!-- file: (\S+) -->\n)?```(\w+)\n(.*?)```", re.S)
    return [(m.group(2), m.group(3), m.group(1)) for m in pattern.finditer(text)]


def _commands(text: str) -> list[str]:
    out = []
    for kind, body, _ in _blocks(text):
        if kind == "bash":
            out += [line for line in body.splitlines() if line.strip() and not line.startswith("#")]
    return out


def _swap_network(text: str, phrase: str) -> str:
    """``text`` with the document's network replaced by the test's where it is ``phrase``;
    nowhere else may ``text`` name the document's network (outside comments)."""
    swapped = text.replace(phrase, phrase.replace(DOC_NETWORK, NETWORK))
    code = "\n".join(line.split("#")[0] for line in swapped.splitlines())
    assert not re.search(rf"\b{DOC_NETWORK}\b", code), f"{DOC_NETWORK} named elsewhere: {text}"
    return swapped


def _write_faces(root: Path, identities, per_id: int, start_label: int) -> None:
    import cv2

    from otface.demo.photos import Stream, photo

    for label, idn in enumerate(identities, start=start_label):
        folder = root / f"person_{label:03d}"
        folder.mkdir(parents=True)
        for j in range(per_id):
            face = photo(0, Stream.TRAIN, idn, label, j)
            image = np.ascontiguousarray(face.image)
            assert cv2.imwrite(str(folder / f"{j:04d}.jpg"), image[:, :, ::-1])


def _workdir(tmp_path: Path) -> Path:
    from otface.backbones import get_model
    from otface.demo.photos import identities

    work = tmp_path / "work"
    work.mkdir()
    for name in ("train.py", "eval", "plugin"):  # the checkout's root, as the doc assumes
        (work / name).symlink_to(ROOT / name)
    configs_folder(work)
    faces = identities(0, 0, 24)
    _write_faces(work / "my_faces", faces[:16], 5, 0)  # 16 identities x 5: one batch of 64
    _write_faces(work / "my_pairs", faces[16:], 3, 16)  # held-out identities for the pairs
    rng = np.random.default_rng(0)
    people = sorted(p.name for p in (work / "my_pairs").iterdir())
    lines = []
    for i in range(40):
        if i % 2 == 0:
            who = people[i // 2 % len(people)]
            a, b = rng.choice(3, size=2, replace=False)
            lines.append(f"my_pairs/{who}/{a:04d}.jpg my_pairs/{who}/{b:04d}.jpg 1")
        else:
            p, q = rng.choice(len(people), size=2, replace=False)
            lines.append(
                f"my_pairs/{people[p]}/{rng.integers(3):04d}.jpg "
                f"my_pairs/{people[q]}/{rng.integers(3):04d}.jpg 0"
            )
    (work / "my_pairs.txt").write_text("\n".join(lines) + "\n")
    (work / "pretrained").mkdir()
    torch.manual_seed(0)
    torch.save(get_model(NETWORK).state_dict(), work / "pretrained" / "model.pt")
    return work


@pytest.mark.slow
def test_walkthrough_runs_as_written(tmp_path):
    text = DOC.read_text(encoding="utf-8")
    commands = _commands(text)
    assert [c.split()[1] for c in commands] == [
        "-m",
        "train.py",
        "eval/verification.py",
        "eval/verification.py",
        "-m",
    ], commands
    work = _workdir(tmp_path)
    files = [(body, name) for kind, body, name in _blocks(text) if name]
    assert [name for _, name in files] == ["configs/my_faces_otface.py"]
    for body, name in files:
        (work / name).write_text(_swap_network(body, f'config.network = "{DOC_NETWORK}"'))
    assert f'config.network = "{NETWORK}"' in (work / files[0][1]).read_text()
    commands = [_swap_network(c, f"--network {DOC_NETWORK}") for c in commands]
    assert sum(f"--network {NETWORK}" in c for c in commands) == 1, commands
    # `python` is this interpreter: its own folder first on PATH (a venv's bin holds `python`).
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "python").exists(), f"no `python` beside {sys.executable}"
    env = dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        PYTHONPATH=str(ROOT / "plugin"),
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
    )
    outputs = []
    for command in commands:
        done = subprocess.run(
            command, shell=True, cwd=work, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
        outputs.append(done.stdout + done.stderr)
    pack, train, before, after, export = outputs
    assert "80 images" in pack and "16 identities" in pack
    assert (work / "my_data" / "train.rec").is_file()
    log = (work / "work_dirs" / "my_faces_otface" / "training.log").read_text()
    assert f"init_backbone: {NETWORK} weights from pretrained/model.pt (state_dict)" in log
    assert "num_classes = 'auto'" in log and "num_image = 'auto'" in log
    frozen = re.search(r"held fixed for steps 1\.\.(\d+) \(0\.25 of (\d+)\)", log)
    assert frozen and 0 < int(frozen[1]) < int(frozen[2]), log
    # ... and the backbone trained after it: the fine-tuned weights differ from the start.
    start = torch.load(work / "pretrained" / "model.pt")
    tuned = torch.load(work / "work_dirs" / "my_faces_otface" / "model.pt")
    assert any(not torch.equal(start[k], tuned[k]) for k in start if start[k].is_floating_point())
    for out in (before, after):
        assert re.search(r"my_pairs\b.*\d+\.\d+", out), out
    assert (work / "work_dirs" / "my_faces_otface" / "model.onnx").is_file()


def test_the_documented_keys_exist():
    """Every key in the document's table is a key of configs/base.py."""
    text = DOC.read_text(encoding="utf-8")
    keys = re.findall(r"^\| `(\w+)`(?:, `(\w+)`)? \|", text, re.M)
    names = {k for pair in keys for k in pair if k}
    assert {"init_backbone", "init_centres", "freeze_steps", "backbone_lr_mult"} <= names
    base = (ROOT / "configs" / "base.py").read_text()
    for name in names:
        assert re.search(rf"^config\.{name} = ", base, re.M), name
