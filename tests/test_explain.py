"""The picture of a match: its numbers and flows come from the plan, and it is a PNG."""

from __future__ import annotations

import cv2
import numpy as np
import torch

from otface.backbones import get_model
from otface.demo.photos import Stream, identities, photo
from otface.evaluation.rerank import LocalEmbedder, RerankOptions, ot_similarity
from otface.explain import explain_pair, main


def _faces():
    a, b = identities(0, 5000, 2)
    return photo(0, Stream.VAL, a, 5000, 0).image, photo(0, Stream.VAL, b, 5001, 0).image


def test_flows_are_the_strongest_entries_of_the_plan():
    torch.manual_seed(0)
    net = get_model("r18_lite", num_features=512).eval()
    face_a, face_b = _faces()
    options = RerankOptions(alpha=0.4, grid=4, weights="cross")
    match = explain_pair(net, face_a, face_b, options, n_flows=5)
    # The same plan, computed here from the local features directly.
    emb, local = LocalEmbedder(net, grid=4)(np.stack([face_a, face_b]).transpose(0, 3, 1, 2))
    ref = ot_similarity(torch.from_numpy(local[:1]), torch.from_numpy(local[1:]), weights="cross")
    plan = ref.plan[0].double().numpy()
    np.testing.assert_allclose(match.plan, plan, atol=1e-7)
    assert match.side == 4 and match.plan.shape == (16, 16)
    masses = [m for _, _, m in match.flows]
    assert masses == sorted(masses, reverse=True) and len(masses) == 5
    assert masses[0] == plan.max() and masses[-1] >= np.sort(plan, axis=None)[-5]
    for i, j, m in match.flows:
        assert plan[i, j] == m
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    assert abs(match.cosine - float(e[0] @ e[1])) < 1e-6
    assert abs(match.combined - (0.4 * match.s_ot + 0.6 * match.cosine)) < 1e-12


def test_command_writes_a_png(tmp_path, capsys):
    torch.manual_seed(0)
    torch.save(get_model("r18_lite", num_features=512).state_dict(), tmp_path / "model.pt")
    paths = []
    for k, face in enumerate(_faces()):
        paths.append(str(tmp_path / f"face{k}.png"))
        cv2.imwrite(paths[-1], face[:, :, ::-1])
    out = tmp_path / "match.png"
    argv = ["--model", str(tmp_path / "model.pt"), "--network", "r18_lite", *paths, "-o", str(out)]
    assert main(argv) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    picture = cv2.imread(str(out))
    assert picture.shape[0] > 300 and picture.shape[1] > 600
    assert "s_OT" in capsys.readouterr().out
    # A missing image is one error line.
    assert main(argv[:4] + [paths[0], str(tmp_path / "nope.png"), "-o", str(out)]) == 2
    assert "cannot read" in capsys.readouterr().err
