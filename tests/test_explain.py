"""The picture of a match: its numbers and flows come from the plan, and it is a PNG."""

from __future__ import annotations

import cv2
import numpy as np
import torch

from otface.backbones import get_model
from otface.demo.photos import Stream, identities, photo
from otface.evaluation.rerank import LocalEmbedder, RerankOptions, ot_similarity
from otface.explain import explain_pair, explain_search, main


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
    ref = ot_similarity(
        torch.from_numpy(local[:1]),
        torch.from_numpy(local[1:]),
        weights="cross",
        relaxation=options.relaxation,
    )
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


def _gallery(n_ids=3, per_id=3):
    idns = identities(0, 6000, n_ids)
    return np.stack(
        [photo(0, Stream.VAL, idn, 6000 + i, j).image for i, idn in enumerate(idns)
         for j in range(per_id)]
    )  # fmt: skip


def test_search_before_and_after_re_ranking():
    torch.manual_seed(0)
    net = get_model("r18_lite", num_features=512).eval()
    gallery = _gallery()
    probe = photo(0, Stream.VAL, identities(0, 6000, 1)[0], 6000, 7).image
    options = RerankOptions(alpha=0.5, k=4, grid=3)
    search = explain_search(net, probe, gallery, options, top=5)
    emb, local = LocalEmbedder(net, grid=3)(
        np.concatenate([probe[None], gallery]).transpose(0, 3, 1, 2)
    )
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    cosine = e[1:] @ e[0]
    np.testing.assert_allclose(search.cosine, cosine, atol=1e-6)
    assert list(search.before) == list(np.argsort(-cosine)[:5])
    top4 = np.argsort(-cosine)[:4]
    assert np.isfinite(search.s_ot[top4]).all() and np.isnan(np.delete(search.s_ot, top4)).all()
    np.testing.assert_allclose(
        search.stage2[top4], 0.5 * search.s_ot[top4] + 0.5 * search.cosine[top4], atol=1e-12
    )
    assert set(search.after[:4]) == set(top4)  # the re-scored four stay ahead of the rest
    assert list(search.after) == list(np.argsort(-search.stage2, kind="stable")[:5])
    same = explain_search(net, probe, gallery, options._replace(alpha=0.0), top=5)
    assert list(same.after) == list(same.before)


def test_search_command_writes_a_png(tmp_path, capsys):
    torch.manual_seed(0)
    torch.save(get_model("r18_lite", num_features=512).state_dict(), tmp_path / "model.pt")
    for k, face in enumerate(_gallery(2, 2)):
        (tmp_path / "gallery" / f"id{k // 2}").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / "gallery" / f"id{k // 2}" / f"{k}.png"), face[:, :, ::-1])
    probe = tmp_path / "probe.png"
    cv2.imwrite(str(probe), _faces()[0][:, :, ::-1])
    out = tmp_path / "top.png"
    argv = ["--model", str(tmp_path / "model.pt"), "--network", "r18_lite", str(probe)]
    assert main(argv + ["--gallery", str(tmp_path / "gallery"), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert text.count("id0/") == 4 and text.count("id1/") == 4  # 4 faces in each of two rows
    (tmp_path / "list.txt").write_text("gallery/id0/0.png\ngallery/id1/3.png\n")
    assert main(argv + ["--gallery", str(tmp_path / "list.txt"), "-o", str(out)]) == 0
    assert "re-ranked" in capsys.readouterr().out
    assert main(argv + ["--gallery", str(tmp_path / "nowhere"), "-o", str(out)]) == 2
    assert "neither a list file nor a folder" in capsys.readouterr().err
