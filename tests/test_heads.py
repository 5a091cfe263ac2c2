"""AdaFace and CurricularFace heads against plain per-element implementations of the papers'
formulas (Kim et al., CVPR 2022; Huang et al., CVPR 2020), written here in Python floats:
alone, inside Partial FC (sampled centres, targets on another shard), on two gloo ranks
against one process, and through a reshard of their checkpoints."""

import math
import statistics

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from _spawn import free_port

from otface.heads import AdaFaceMargin, CurricularFaceMargin
from otface.partial_fc import PartialFC

S = 64.0
EPS = 1e-3  # AdaFace's clamp of the cosines and of the shifted angle


# -------------------------------------------------------------------- the papers, element-wise


class AdaFaceRef:
    """AdaFace with Python floats: mu, sigma start at 20 and 100 (the authors' values)."""

    def __init__(self, m=0.4, h=0.333, t_alpha=0.01):
        self.m, self.h, self.a = m, h, t_alpha
        self.mu, self.sigma = 20.0, 100.0

    def __call__(self, cos, labels, norms):
        norms = [min(max(float(n), 0.001), 100.0) for n in norms]
        self.mu = statistics.fmean(norms) * self.a + (1 - self.a) * self.mu
        self.sigma = statistics.stdev(norms) * self.a + (1 - self.a) * self.sigma
        out = []
        for row, y, n in zip(cos.tolist(), labels.tolist(), norms):
            g = min(max(self.h * (n - self.mu) / (self.sigma + EPS), -1.0), 1.0)
            logits = []
            for j, c in enumerate(row):
                c = min(max(c, -1 + EPS), 1 - EPS)
                if j == y:
                    angle = min(max(math.acos(c) - self.m * g, EPS), math.pi - EPS)
                    c = math.cos(angle) - (self.m + self.m * g)
                logits.append(S * c)
            out.append(logits)
        return torch.tensor(out, dtype=torch.float64)


class CurricularRef:
    """CurricularFace with Python floats: t starts at 0."""

    def __init__(self, m=0.5, alpha=0.01):
        self.m, self.a, self.t = m, alpha, 0.0

    def __call__(self, cos, labels, target_cos):
        target_cos = [float(v) for v in target_cos]
        self.t = statistics.fmean(target_cos) * self.a + (1 - self.a) * self.t
        out = []
        for row, y, tc in zip(cos.tolist(), labels.tolist(), target_cos):
            boundary = math.cos(math.acos(tc) + self.m)
            logits = []
            for j, c in enumerate(row):
                if j == y:
                    if tc > math.cos(math.pi - self.m):
                        c = math.cos(math.acos(c) + self.m)
                    else:  # theta + m past pi: the authors' linear fallback
                        c = c - math.sin(math.pi - self.m) * self.m
                elif c > boundary:
                    c = c * (self.t + c)
                logits.append(S * c)
            out.append(logits)
        return torch.tensor(out, dtype=torch.float64)


def _close(ours, ref, atol=1e-5):
    # Logits compared as cosines (divided by the scale 64) to 1e-5, in float32.
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double() / S, ref / S, rtol=0, atol=atol)


def _cosines(n, c, seed):
    g = torch.Generator().manual_seed(seed)
    cos = torch.rand(n, c, generator=g) * 2 - 1
    cos[0, 0], cos[1, 1] = 1.0, -1.0  # acos at the ends
    return cos


# ---------------------------------------------------------------------------------- AdaFace


def test_adaface_two_steps_with_known_norms_equal_the_paper():
    head, ref = AdaFaceMargin(S, m=0.4, h=0.333, t_alpha=0.01), AdaFaceRef()
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 2, 7])
    # Norms around the running mean, one far below (margin scaler clipped to -1), one far
    # above (+1), one under the 0.001 floor.
    for step, norms in enumerate(
        (
            [20.0, 25.0, 15.0, 0.0001, 400.0, 19.0, 21.0, 22.5],
            [30.0, 31.0, 18.0, 5.0, 90.0, 2, 3, 4],
        )
    ):
        cos = _cosines(8, 9, seed=step)
        ours = head(cos, labels, norms=torch.tensor(norms))
        _close(ours, ref(cos, labels, norms))
        assert head.batch_mean.item() == pytest.approx(ref.mu, rel=1e-6)
        assert head.batch_std.item() == pytest.approx(ref.sigma, rel=1e-6)


def test_adaface_first_step_numbers_by_hand():
    # mu = 0.01*10 + 0.99*20 = 19.9, sigma = 0.01*0 + 0.99*100 = 99 (norms all 10: std 0);
    # g = clip(0.333 * (10 - 19.9) / 99.001) = -0.0333; target = cos(acos(0.5) + 0.4 * 0.0333)
    # - 0.4 * (1 - 0.0333).
    head = AdaFaceMargin(S)
    cos = torch.tensor([[0.5, 0.2]])
    out = head(cos, torch.tensor([0]), norms=torch.tensor([10.0]))
    g = 0.333 * (10 - 19.9) / (99 + 1e-3)
    expected = math.cos(math.pi / 3 - 0.4 * g) - 0.4 * (1 + g)
    assert head.batch_mean.item() == pytest.approx(19.9)
    assert head.batch_std.item() == pytest.approx(99.0)
    assert out[0, 0].item() == pytest.approx(S * expected, abs=1e-4)
    assert out[0, 1].item() == pytest.approx(S * 0.2, abs=1e-5)


def test_adaface_rows_whose_target_is_elsewhere_get_no_margin_but_count_in_the_norms():
    # Two column shards of the same logits: each row's margin appears in the shard holding its
    # class only, and both shards see every row's norm (Partial FC gathers them all).
    cos, labels = _cosines(6, 10, seed=3), torch.tensor([0, 9, 4, 5, 1, 8])
    norms = torch.tensor([12.0, 40.0, 25.0, 8.0, 19.0, 33.0])
    ref = AdaFaceRef()(cos, labels, norms.tolist())
    parts = []
    for lo, hi in ((0, 5), (5, 10)):
        local = torch.where(
            (labels >= lo) & (labels < hi), labels - lo, torch.full_like(labels, -1)
        )
        parts.append(AdaFaceMargin(S)(cos[:, lo:hi], local.view(-1, 1), norms=norms))
    _close(torch.cat(parts, dim=1), ref)


def test_adaface_gradients_are_finite_at_the_ends():
    cos = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], requires_grad=True)
    out = AdaFaceMargin(S)(cos, torch.tensor([0, 0]), norms=torch.tensor([1.0, 60.0]))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(cos.grad).all()


# --------------------------------------------------------------------------- CurricularFace


def test_curricularface_two_steps_equal_the_paper():
    head, ref = CurricularFaceMargin(S, m=0.5, alpha=0.01), CurricularRef()
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 2])
    for step in range(2):
        cos = _cosines(7, 8, seed=10 + step)
        cos[2, 2] = -0.95  # theta + m past pi: the fallback branch
        target = cos.gather(1, labels.view(-1, 1)).squeeze(1)
        ours = head(cos, labels, target_cos=target)
        _close(ours, ref(cos, labels, target.tolist()))
        assert head.t.item() == pytest.approx(ref.t, rel=1e-6, abs=1e-9)
        # Some negatives were hard and modulated, others were not: both branches are tested.
        boundary = torch.cos(torch.acos(target) + 0.5).unsqueeze(1)
        hard = (cos > boundary).scatter(1, labels.view(-1, 1), False)
        assert 0 < int(hard.sum()) < hard.numel() - 7


def test_curricularface_t_by_hand():
    head = CurricularFaceMargin(S, m=0.5, alpha=0.01)
    cos = torch.tensor([[0.8, 0.7, 0.1], [0.2, 0.6, 0.3]])
    labels = torch.tensor([0, 1])
    out = head(cos, labels, target_cos=torch.tensor([0.8, 0.6]))
    t = 0.01 * 0.7
    assert head.t.item() == pytest.approx(t)
    # Row 0: cos(acos 0.8 + 0.5) = 0.4152; 0.7 is hard, 0.1 is not.
    assert out[0, 0].item() == pytest.approx(S * math.cos(math.acos(0.8) + 0.5), abs=1e-4)
    assert out[0, 1].item() == pytest.approx(S * 0.7 * (t + 0.7), abs=1e-4)
    assert out[0, 2].item() == pytest.approx(S * 0.1, abs=1e-5)


def test_curricularface_target_elsewhere_still_decides_the_hard_negatives():
    cos, labels = _cosines(6, 10, seed=5), torch.tensor([0, 9, 4, 5, 1, 8])
    target = cos.gather(1, labels.view(-1, 1)).squeeze(1)
    ref = CurricularRef()(cos, labels, target.tolist())
    parts = []
    for lo, hi in ((0, 5), (5, 10)):
        local = torch.where(
            (labels >= lo) & (labels < hi), labels - lo, torch.full_like(labels, -1)
        )
        part = CurricularFaceMargin(S)(cos[:, lo:hi], local.view(-1, 1), target_cos=target)
        parts.append(part)
    _close(torch.cat(parts, dim=1), ref)


def test_curricularface_gradients_are_finite_at_the_ends():
    cos = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], requires_grad=True)
    labels = torch.tensor([0, 0])
    out = CurricularFaceMargin(S)(cos, labels, target_cos=cos.detach()[:, 0])
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(cos.grad).all()


def test_heads_refuse_bad_values_and_missing_inputs():
    with pytest.raises(ValueError, match="adaface.h"):
        AdaFaceMargin(S, h=0.0)
    with pytest.raises(ValueError, match="curricularface.alpha"):
        CurricularFaceMargin(S, alpha=1.5)
    with pytest.raises(ValueError, match="norms"):
        AdaFaceMargin(S)(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="target_cos"):
        CurricularFaceMargin(S)(torch.zeros(2, 3), torch.tensor([0, 1]))


# ------------------------------------------------------------------------------ Partial FC

D, NUM_CLASSES = 8, 13


def _batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, D, generator=g) * torch.linspace(0.5, 40.0, n).unsqueeze(1)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return emb, labels


def _reference_logits(ref, emb, labels, weight, index):
    """The paper's logits over the sampled centres ``index`` (float64 cosines, a row's label
    remapped to its column there)."""
    cos = (F.normalize(emb.double()) @ F.normalize(weight.double()).T)[:, index].float()
    column = torch.searchsorted(index, labels)
    target = cos.gather(1, column.view(-1, 1)).squeeze(1)
    extra = emb.norm(dim=1).tolist() if isinstance(ref, AdaFaceRef) else target.tolist()
    return ref(cos, column, extra), column


@pytest.mark.parametrize("name", ["adaface", "curricularface"])
def test_partial_fc_with_sampled_centres_equals_the_paper_over_two_steps(name):
    head = AdaFaceMargin(S) if name == "adaface" else CurricularFaceMargin(S)
    ref = AdaFaceRef() if name == "adaface" else CurricularRef()
    pfc = PartialFC(head, D, NUM_CLASSES, sample_rate=0.7, seed=3)
    seen = []
    head.register_forward_hook(lambda mod, args, out: seen.append(out.detach()))
    for step in range(2):
        emb, labels = _batch(10, seed=step)
        loss = pfc(emb, labels, step=step)
        index = pfc.sampled_index
        assert index.numel() < NUM_CLASSES  # some centres sampled out
        ref_logits, column = _reference_logits(ref, emb, labels, pfc.weight.detach(), index)
        _close(seen[-1], ref_logits)
        ref_loss = F.cross_entropy(ref_logits, column)
        assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
    stats = pfc.statistics()
    if name == "adaface":
        assert stats["head_norm_mean"].item() == pytest.approx(ref.mu, rel=1e-6)
        assert stats["head_norm_std"].item() == pytest.approx(ref.sigma, rel=1e-6)
        assert set(pfc.state_dict()) == {
            "weight",
            "margin_softmax.batch_mean",
            "margin_softmax.batch_std",
        }
    else:
        assert stats["head_t"].item() == pytest.approx(ref.t, rel=1e-5, abs=1e-8)
        assert set(pfc.state_dict()) == {"weight", "margin_softmax.t"}


@pytest.mark.parametrize("name", ["adaface", "curricularface"])
def test_partial_fc_heads_are_finite_at_cos_one_under_half_precision_input(name):
    # Embeddings on their class centres (cos θ ≈ 1, and ≈ -1 for the negated row), given in
    # bfloat16 under an outer autocast: the margin runs on float32 cosines, no NaN from acos.
    head = AdaFaceMargin(S) if name == "adaface" else CurricularFaceMargin(S)
    pfc = PartialFC(head, D, NUM_CLASSES, seed=1)
    labels = torch.tensor([0, 1, 2, 3])
    centres = pfc.weight.detach()[labels] * 1000
    emb = torch.cat([centres[:3], -centres[3:]]).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pfc(emb, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.isfinite(emb.grad).all() and torch.isfinite(pfc.weight.grad).all()
    assert all(torch.isfinite(v).all() for v in pfc.statistics().values())


# ---------------------------------------------------------------------- two ranks over gloo


def _two_rank_worker(rank, world_size, port, batches, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        out = {}
        for name in ("adaface", "curricularface"):
            head = AdaFaceMargin(S) if name == "adaface" else CurricularFaceMargin(S)
            pfc = PartialFC(head, D, NUM_CLASSES, seed=3)
            for step, (emb, labels) in enumerate(batches):
                b = emb.shape[0] // world_size
                part = slice(rank * b, (rank + 1) * b)
                out[f"{name}/loss{step}"] = pfc(emb[part], labels[part], step=step).detach()
            out[name] = {k: v.clone() for k, v in pfc.statistics().items()}
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_share_the_statistics_of_the_global_batch(tmp_path):
    batches = [_batch(12, seed=20 + step) for step in range(2)]
    mp.spawn(
        _two_rank_worker,
        args=(2, free_port(), batches, str(tmp_path)),
        nprocs=2,
        join=True,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name in ("adaface", "curricularface"):
        # Bit for bit the same on both ranks.
        assert ranks[0][name].keys() == ranks[1][name].keys()
        for key, value in ranks[0][name].items():
            assert torch.equal(value, ranks[1][name][key]), key
        # The same as one process that sees the same global batches: each rank holds half
        # the centres, so half the rows have their target on the other rank.
        head = AdaFaceMargin(S) if name == "adaface" else CurricularFaceMargin(S)
        single = PartialFC(head, D, NUM_CLASSES, seed=3)
        for step, (emb, labels) in enumerate(batches):
            loss = single(emb, labels, step=step).detach()
            assert torch.equal(ranks[0][f"{name}/loss{step}"], ranks[1][f"{name}/loss{step}"])
            torch.testing.assert_close(ranks[0][f"{name}/loss{step}"], loss, rtol=1e-6, atol=1e-6)
        for key, value in single.statistics().items():
            torch.testing.assert_close(ranks[0][name][key], value, rtol=1e-6, atol=1e-7)


def test_resharding_carries_the_statistics_beside_the_centres():
    # Checkpoints of 2 ranks cut for rank 1 of 3: the centres are the rows that rank holds,
    # the statistics (the same on every rank) come along unchanged, and the result loads
    # into Partial FC with the head.
    from otface.partial_fc import shard_range
    from otface.train.reshard import FC_KEY, gather_fc_rows, with_fc_shard

    def saved(rank):
        start, count = shard_range(10, rank=rank, world_size=2)
        weight = torch.arange(start, start + count).float().unsqueeze(1).repeat(1, D)
        return {
            FC_KEY: {"weight": weight, "margin_softmax.t": torch.tensor([0.25])},
            "state_optimizer": {
                "state": {1: {"momentum_buffer": 2 * weight}},
                "param_groups": [{"params": [0]}, {"params": [1]}],
            },
        }

    states = [saved(0), saved(1)]
    shard = gather_fc_rows(
        lambda s: (states[s], f"checkpoint_gpu_{s}.pt"),
        source_world_size=2,
        num_classes=10,
        rank=1,
        world_size=3,
    )
    out = with_fc_shard(states[1], shard, "checkpoint_gpu_1.pt")[FC_KEY]
    start, count = shard_range(10, rank=1, world_size=3)
    assert out["weight"][:, 0].tolist() == list(range(start, start + count))
    pfc = PartialFC(CurricularFaceMargin(S), D, count)
    pfc.load_state_dict(out)
    assert pfc.margin_softmax.t.item() == 0.25
