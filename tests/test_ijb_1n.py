"""IJB 1:N identification: ranks, TPIR at FPIR, the meta lists, the demo lists and the command.

The references are plain per-probe loops written here from the definitions stated in the issue
(InsightFace's ``ijb_1n.py``: one pool of non-mated scores, the ``ceil(n_probes * FPIR)``-th
largest as threshold; NIST: each probe's highest non-mated score), not the module's code.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
from _scripts import load_eval_script

from otface.evaluation.ijb import TemplateFeatures
from otface.evaluation.ijb_1n import (
    evaluate_identification,
    identification_metrics,
    mate_indices,
)
from otface.evaluation.ijb_meta import IJBLayoutError, read_ijb_1n_meta


def _loop_reference(sim, mates, ranks, fpirs, method):
    """Per-probe loops over the definitions; ``sim`` a list of lists, ``mates`` -1 = none."""
    n_probes = len(sim)
    mated = [p for p in range(n_probes) if mates[p] >= 0]
    rank_of = {}
    for p in mated:
        s_mate = sim[p][mates[p]]
        ahead = 0
        for g, s in enumerate(sim[p]):
            if g != mates[p] and s >= s_mate:  # a tie counts against the probe
                ahead += 1
        rank_of[p] = 1 + ahead
    rank_rates = [sum(1 for p in mated if rank_of[p] <= r) / len(mated) for r in ranks]
    if method == "arcface_torch":
        pool = []
        for p in range(n_probes):
            for g, s in enumerate(sim[p]):
                if g != mates[p]:
                    pool.append(s)
    else:
        pool = []
        for p in range(n_probes):
            pool.append(max(s for g, s in enumerate(sim[p]) if g != mates[p]))
    pool = sorted(pool, reverse=True)
    tpirs = []
    for f in fpirs:
        th = pool[math.ceil(n_probes * f) - 1]
        hits = 0
        for p in mated:
            if sim[p][mates[p]] > th and (method == "arcface_torch" or rank_of[p] == 1):
                hits += 1
        tpirs.append(hits / len(mated))
    return rank_rates, tpirs


def _hand_set():
    """6 probes x 4 gallery templates, by hand: ties at the mate, a non-mated probe, a probe
    whose mate is beaten by two others."""
    sim = [
        [0.9, 0.1, 0.2, 0.3],  # mate 0, rank 1
        [0.5, 0.5, 0.4, 0.1],  # mate 1, tied with gallery 0: rank 2 (tie counts against)
        [0.7, 0.6, 0.3, 0.2],  # mate 2, beaten by 0 and 1: rank 3
        [0.2, 0.3, 0.4, 0.8],  # mate 3, rank 1
        [0.6, 0.1, 0.1, 0.1],  # non-mated
        [0.1, 0.2, 0.3, 0.35],  # mate 3, rank 1 but a low mated score
    ]
    mates = [0, 1, 2, 3, -1, 3]
    return sim, mates


def test_hand_set_by_hand():
    sim, mates = _hand_set()
    rates, cmc, tpirs, th, orders = identification_metrics(
        np.array(sim), np.array(mates), ranks=(1, 2, 3), fpirs=(0.2, 0.5)
    )
    # mated probes 0,1,2,3,5 with ranks 1,2,3,1,1
    np.testing.assert_allclose(rates, [3 / 5, 4 / 5, 5 / 5])
    np.testing.assert_allclose(cmc, [3 / 5, 4 / 5, 1, 1])
    # pool: every score but the 5 mated ones (19 scores); k = ceil(6 * 0.2) = 2, ceil(3) = 3
    np.testing.assert_array_equal(orders, [2, 3])
    # largest non-mated scores: 0.7, 0.6, 0.6, 0.5, ... -> thresholds 0.6 and 0.6
    np.testing.assert_allclose(th, [0.6, 0.6])
    # mated scores 0.9, 0.5, 0.3, 0.8, 0.35: above 0.6 are 0.9 and 0.8
    np.testing.assert_allclose(tpirs, [2 / 5, 2 / 5])
    # NIST: per-probe top non-mated 0.3, 0.5, 0.7, 0.4, 0.6, 0.3; k=2 -> 0.6, k=3 -> 0.5;
    # rank-1 mates above: 0.9 (p0), 0.8 (p3) for both
    _, _, tpirs_n, th_n, _ = identification_metrics(
        np.array(sim), np.array(mates), ranks=(1,), fpirs=(0.2, 0.5), fpir_method="nist"
    )
    np.testing.assert_allclose(th_n, [0.6, 0.5])
    np.testing.assert_allclose(tpirs_n, [2 / 5, 2 / 5])


@pytest.mark.parametrize("method", ["arcface_torch", "nist"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_per_probe_loops_with_ties(seed, method):
    rng = np.random.default_rng(seed)
    n_probes, n_gallery = 60, 17
    # scores on a coarse grid so that ties are frequent, including ties with the mate
    sim = rng.integers(-5, 6, size=(n_probes, n_gallery)) / 5.0
    mates = rng.integers(0, n_gallery, size=n_probes)
    mates[rng.random(n_probes) < 0.25] = -1  # non-mated probes
    sim[mates >= 0, mates[mates >= 0]] += 0.2 * (rng.random(np.sum(mates >= 0)) < 0.5)
    ranks, fpirs = (1, 5, 10), (0.01, 0.1, 0.3)
    rates, cmc, tpirs, _, _ = identification_metrics(
        sim, mates, ranks=ranks, fpirs=fpirs, fpir_method=method
    )
    ref_rates, ref_tpirs = _loop_reference(sim.tolist(), mates.tolist(), ranks, fpirs, method)
    np.testing.assert_allclose(rates, ref_rates)
    np.testing.assert_allclose(tpirs, ref_tpirs)
    ref_cmc, _ = _loop_reference(sim.tolist(), mates.tolist(), range(1, n_gallery + 1), (), method)
    np.testing.assert_allclose(cmc, ref_cmc)


def test_upstream_reading_on_continuous_scores():
    """With every probe mated and no ties, rank-k equals the argsort reading of ijb_1n.py."""
    rng = np.random.default_rng(5)
    sim = rng.normal(size=(40, 12))
    mates = rng.integers(0, 12, size=40)
    top = np.argsort(-sim, axis=1)
    rates, *_ = identification_metrics(sim, mates, ranks=(1, 5, 10))
    expected = [np.mean([mates[i] in top[i, :k] for i in range(40)]) for k in (1, 5, 10)]
    np.testing.assert_allclose(rates, expected)


def test_mate_indices_and_single_gallery_subjects():
    # subject 7 is only in the first half of the gallery, 9 only in the second, 4 in none
    gallery = np.array([7, 3, 9, 5])
    np.testing.assert_array_equal(mate_indices(np.array([9, 7, 4, 5]), gallery), [2, 0, -1, 3])
    with pytest.raises(ValueError, match="more than one gallery template"):
        mate_indices(np.array([1]), np.array([1, 1]))


def test_too_few_nonmated_scores_and_no_mate():
    with pytest.raises(ValueError, match="no probe has a mate"):
        identification_metrics(np.zeros((2, 2)), np.array([-1, -1]))
    with pytest.raises(ValueError, match="fpir_method"):
        identification_metrics(np.zeros((2, 2)), np.array([0, 1]), fpir_method="other")


def _write_csv(path, rows):
    path.write_text("TEMPLATE_ID,SUBJECT_ID,FILENAME\n" + "".join(f"{r}\n" for r in rows))


def test_meta_lists_and_their_errors(tmp_path):
    meta = tmp_path / "meta"
    meta.mkdir()
    _write_csv(meta / "ijbc_1N_gallery_G1.csv", ["1,10,a.jpg", "1,10,b.jpg", "2,20,c.jpg"])
    _write_csv(meta / "ijbc_1N_gallery_G2.csv", ["3,30,d.jpg"])
    _write_csv(meta / "ijbc_1N_probe_mixed.csv", ["5,20,e.jpg", "4,10,f.jpg", "6,99,g.jpg"])
    m = read_ijb_1n_meta(tmp_path, "IJBC", np.arange(1, 7))
    assert [g[0] for g in m.galleries] == ["G1", "G2"]
    np.testing.assert_array_equal(m.galleries[0][1], [1, 2])
    np.testing.assert_array_equal(m.galleries[0][2], [10, 20])
    np.testing.assert_array_equal(m.probe_templates, [4, 5, 6])
    np.testing.assert_array_equal(m.probe_subjects, [10, 20, 99])
    with pytest.raises(IJBLayoutError, match="template 6 has no face"):
        read_ijb_1n_meta(tmp_path, "IJBC", np.arange(1, 6))
    _write_csv(meta / "ijbc_1N_gallery_G2.csv", ["3,10,d.jpg"])
    with pytest.raises(IJBLayoutError, match="subject 10 has 2 gallery templates"):
        read_ijb_1n_meta(tmp_path, "IJBC", np.arange(1, 7))
    _write_csv(meta / "ijbc_1N_gallery_G2.csv", ["3,30,d.jpg", "3,31,e.jpg"])
    with pytest.raises(IJBLayoutError, match=r"ijbc_1N_gallery_G2.csv line 3: .*subject 30"):
        read_ijb_1n_meta(tmp_path, "IJBC", np.arange(1, 7))
    _write_csv(meta / "ijbc_1N_gallery_G2.csv", ["3,x,d.jpg"])
    with pytest.raises(IJBLayoutError, match="line 2: non-integer"):
        read_ijb_1n_meta(tmp_path, "IJBC", np.arange(1, 7))
    # IJB-B names its galleries S1 / S2
    with pytest.raises(IJBLayoutError, match="ijbb_1N_gallery_S1.csv"):
        read_ijb_1n_meta(tmp_path, "IJBB", np.arange(1, 7))


def test_evaluate_identification_scores_pooled_features():
    # 3 gallery templates, 3 probes; features are unit vectors at known angles
    angles = {1: 0.0, 2: 1.0, 3: 2.0, 11: 0.1, 12: 2.2, 13: 1.5}
    templates = np.array(sorted(angles))
    feats = np.array([[np.cos(angles[t]), np.sin(angles[t])] for t in templates], np.float32)
    pooled = TemplateFeatures(templates, feats)
    from otface.evaluation.ijb_meta import IJB1NMeta

    meta = IJB1NMeta(
        galleries=[
            ("G1", np.array([1, 3]), np.array([100, 300])),
            ("G2", np.array([2]), np.array([200])),
        ],
        probe_templates=np.array([11, 12, 13]),
        probe_subjects=np.array([100, 200, 999]),
        files=[],
    )
    res = evaluate_identification(pooled, meta, "t", ranks=(1, 2), fpirs=(0.5,))
    np.testing.assert_array_equal(res.gallery_templates, [1, 2, 3])  # G1 + G2, sorted by id
    np.testing.assert_array_equal(res.mates, [0, 1, -1])
    expected = np.cos(np.subtract.outer([0.1, 2.2, 1.5], [0.0, 1.0, 2.0]))
    np.testing.assert_allclose(res.similarity, expected, atol=1e-6)
    # probe 11 -> template 1 at rank 1; probe 12 (angle 2.2) is closest to 3, its mate 2 is
    # second: rank 2
    np.testing.assert_allclose(res.rank_rates, [0.5, 1.0])


def test_demo_lists_follow_the_release_layout(tiny_demo):
    from otface.evaluation.ijb_meta import read_ijb_meta

    meta = read_ijb_meta(tiny_demo / "ijb", "demo")
    m = read_ijb_1n_meta(tiny_demo / "ijb", "demo", np.unique(meta.templates))
    (n1, t1, s1), (n2, t2, s2) = m.galleries
    assert (n1, n2) == ("G1", "G2") and len(t1) and len(t2)
    assert not set(s1) & set(s2)  # disjoint galleries
    gallery_subjects = set(s1) | set(s2)
    probe_subjects = set(m.probe_subjects)
    assert probe_subjects - gallery_subjects  # non-mated probes
    assert probe_subjects & set(s1) and probe_subjects & set(s2)  # mated from both galleries
    # every template is in exactly one list; each row's FILENAME is one of the template's faces
    all_templates = np.concatenate([t1, t2, m.probe_templates])
    assert sorted(all_templates) == sorted(np.unique(meta.templates))
    faces = {}
    for name, t in zip(meta.image_names, meta.templates):
        faces.setdefault(int(t), set()).add(name)
    for csv in sorted((tiny_demo / "ijb" / "meta").glob("demo_1N_*.csv")):
        lines = csv.read_text().splitlines()
        assert lines[0] == "TEMPLATE_ID,SUBJECT_ID,FILENAME"
        for line in lines[1:]:
            t, _, name = line.split(",")
            assert name in faces[int(t)]


def test_cli_protocol_all_prints_both_tables_from_one_extraction(
    tmp_path, tiny_demo, monkeypatch, capsys
):
    import otface.evaluation.ijb as ijb_mod
    from otface.backbones import get_model

    work = tmp_path / "work"
    work.mkdir()
    torch.manual_seed(0)
    torch.save(get_model("r18_lite").state_dict(), work / "model.pt")
    script = load_eval_script("ijb")
    calls = []
    real = ijb_mod.extract_features
    monkeypatch.setattr(
        ijb_mod, "extract_features", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    argv = ["--model", str(work / "model.pt"), "--network", "r18_lite", "--device", "cpu"]
    argv += ["--data", str(tiny_demo / "ijb"), "--target", "demo", "--num-workers", "1"]
    out_dir = tmp_path / "out"
    assert script.main(argv + ["--protocol", "all", "--output", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "1:1 verification" in out and "1:N identification" in out
    assert "TPIR@FPIR=1e-02" in out and "Rank-10" in out and "1e-04" in out
    assert len(calls) == 1
    saved = np.load(out_dir / "demo_1n_scores.npz")
    rates, _, tpirs, _, _ = identification_metrics(saved["similarity"], saved["mates"])
    row = (out_dir / "demo_1n.txt").read_text().splitlines()[3]
    cells = [float(v.strip().rstrip("*")) for v in row.strip("| ").split("|")[1:]]
    np.testing.assert_allclose(cells, 100 * np.concatenate([rates, tpirs]), atol=0.006)
    ref_rates, ref_tpirs = _loop_reference(
        saved["similarity"].tolist(), saved["mates"].tolist(), (1, 5, 10), (0.01, 0.1), "nist"
    )
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out_dir / "demo_cmc.png").is_file()
    # the second protocol from the cache: nothing re-embedded; NIST reading on request
    nist = ["--protocol", "1n", "--fpir-method", "nist", "--output", str(out_dir)]
    assert script.main(argv + nist) == 0
    assert len(calls) == 1
    row = (out_dir / "demo_1n.txt").read_text().splitlines()[3]
    cells = [float(v.strip().rstrip("*")) for v in row.strip("| ").split("|")[1:]]
    np.testing.assert_allclose(cells, 100 * np.array(ref_rates + ref_tpirs), atol=0.006)


def test_cli_missing_1n_lists_is_one_error_line(tmp_path, tiny_demo, capsys):
    import shutil

    from otface.backbones import get_model

    data = tmp_path / "ijb"
    shutil.copytree(tiny_demo / "ijb", data)
    (data / "meta" / "demo_1N_probe_mixed.csv").unlink()
    torch.save(get_model("r18_lite").state_dict(), tmp_path / "model.pt")
    script = load_eval_script("ijb")
    argv = ["--model", str(tmp_path / "model.pt"), "--network", "r18_lite", "--device", "cpu"]
    argv += ["--data", str(data), "--target", "demo", "--protocol", "1n"]
    assert script.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: missing") and "demo_1N_probe_mixed.csv" in err[-1]
    assert not list((tmp_path / "ijb_demo").glob("demo_features_*.npy"))  # failed before work
