"""Partial FC against a plain single-process full softmax, on one rank and on two (gloo)."""

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from _spawn import free_port

from otface.dist import all_gather_with_grad, get_rank, get_world_size
from otface.margin import CombinedMarginLoss
from otface.partial_fc import (
    PartialFC,
    dist_softmax_cross_entropy,
    init_class_centres,
    shard_range,
)

S = 64.0
D = 16
NUM_CLASSES = 13  # odd: two ranks hold 7 and 6 centres
MARGINS = [(1.0, 0.5, 0.0), (1.0, 0.0, 0.4), (0.9, 0.3, 0.1)]


def reference_loss(emb, weight, labels, margins, *, straight_through):
    """Plain full softmax: F.cross_entropy on s·margin(normalize(e) @ normalize(W).T)."""
    m1, m2, m3 = margins
    cos = (F.normalize(emb) @ F.normalize(weight).T).clamp(-1, 1)
    target = torch.cos(m1 * torch.acos(cos) + m2) - m3
    delta = target - cos
    if straight_through:
        delta = delta.detach()
    one_hot = F.one_hot(labels, weight.shape[0]).to(cos.dtype)
    return F.cross_entropy(S * (cos + one_hot * delta), labels)


def make_batch(n, num_classes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, D, dtype=torch.float64, generator=gen)
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    return emb, labels


def run_pfc(module, emb, labels):
    emb = emb.clone().requires_grad_(True)
    loss = module(emb, labels)
    loss.backward()
    return loss.detach(), emb.grad, module.weight.grad


def run_reference(weight, emb, labels, margins, straight_through, index=None):
    emb = emb.clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    w, y = weight, labels
    if index is not None:
        w = weight[index]
        y = torch.searchsorted(index, labels)
    loss = reference_loss(emb, w, y, margins, straight_through=straight_through)
    loss.backward()
    return loss.detach(), emb.grad, weight.grad


def assert_close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_no_process_group_means_single_rank():
    assert get_rank() == 0 and get_world_size() == 1
    x = torch.randn(3, 2)
    assert all_gather_with_grad(x)[0] is x


@pytest.mark.parametrize(
    "n, world_size, expected",
    [
        (13, 2, [(0, 7), (7, 6)]),
        (10, 4, [(0, 3), (3, 3), (6, 2), (8, 2)]),
        (8, 1, [(0, 8)]),
    ],
)
def test_shard_range_hand_cases(n, world_size, expected):
    got = [shard_range(n, rank=r, world_size=world_size) for r in range(world_size)]
    assert got == expected


def test_initial_centres_independent_of_sharding():
    num_classes, dim = 9001, 8  # spans three init blocks
    full = init_class_centres(0, num_classes, dim, seed=5)
    for world_size in (2, 3, 7):
        shards = [
            init_class_centres(
                *shard_range(num_classes, rank=r, world_size=world_size), dim, seed=5
            )
            for r in range(world_size)
        ]
        assert torch.equal(torch.cat(shards), full)
    assert abs(full.std().item() - 0.01) < 0.0005
    assert abs(full.mean().item()) < 0.0005
    assert not torch.equal(init_class_centres(0, 10, dim, seed=6), full[:10])


def test_module_state_dict_and_init_match_helper():
    pfc = PartialFC(CombinedMarginLoss(S, 1.0, 0.5, 0.0), D, NUM_CLASSES, seed=3)
    assert list(pfc.state_dict()) == ["weight"]
    assert pfc.weight.shape == (NUM_CLASSES, D)
    assert torch.equal(pfc.weight.detach(), init_class_centres(0, NUM_CLASSES, D, seed=3))


@pytest.mark.parametrize("margins", MARGINS)
def test_single_rank_equals_full_softmax_exact_grad(margins):
    emb, labels = make_batch(10, NUM_CLASSES)
    pfc = PartialFC(CombinedMarginLoss(S, *margins, exact_grad=True), D, NUM_CLASSES).double()
    got = run_pfc(pfc, emb, labels)
    ref = run_reference(pfc.weight, emb, labels, margins, straight_through=False)
    for g, r in zip(got, ref):
        assert_close(g, r)


@pytest.mark.parametrize("margins", MARGINS)
def test_single_rank_default_gradient_is_straight_through(margins):
    emb, labels = make_batch(10, NUM_CLASSES, seed=1)
    pfc = PartialFC(CombinedMarginLoss(S, *margins), D, NUM_CLASSES).double()
    labels_col = labels.view(-1, 1).clone()
    got = run_pfc(pfc, emb, labels_col)
    assert torch.equal(labels_col.view(-1), labels)  # caller's labels untouched
    ref = run_reference(pfc.weight, emb, labels, margins, straight_through=True)
    for g, r in zip(got, ref):
        assert_close(g, r)
    if margins[1] != 0.0:  # an angular margin: the exact gradient differs
        exact = run_reference(pfc.weight, emb, labels, margins, straight_through=False)
        assert not torch.allclose(got[1], exact[1], rtol=1e-3, atol=1e-6)


def test_sampling_keeps_positives_and_matches_restricted_softmax():
    num_classes, margins = 40, (1.0, 0.5, 0.0)
    emb, _ = make_batch(8, num_classes, seed=2)
    labels = torch.tensor([3, 3, 17, 17, 25, 25, 39, 3])
    pfc = PartialFC(
        CombinedMarginLoss(S, *margins, exact_grad=True), D, num_classes, sample_rate=0.3, seed=7
    ).double()
    indices = []
    for _ in range(3):
        got = run_pfc(pfc, emb, labels)
        index = pfc.sampled_index
        indices.append(index)
        assert index.numel() == int(0.3 * num_classes) == 12
        assert torch.equal(index, torch.unique(index))  # sorted, no repeats
        assert set(labels.tolist()) <= set(index.tolist())
        ref = run_reference(pfc.weight, emb, labels, margins, False, index=index)
        assert_close(got[0], ref[0])
        assert_close(got[1], ref[1])
        assert_close(got[2], ref[2])
        unused = torch.ones(num_classes, dtype=torch.bool)
        unused[index] = False
        assert torch.count_nonzero(got[2][unused]) == 0
        pfc.weight.grad = None
    assert not all(torch.equal(indices[0], i) for i in indices[1:])
    # reproducible: the same seed and step pick the same centres
    again = PartialFC(CombinedMarginLoss(S, *margins), D, num_classes, sample_rate=0.3, seed=7)
    again(emb.float(), labels, step=1)
    assert torch.equal(again.sampled_index, indices[1])


def test_sampling_with_more_positives_than_samples_uses_all_positives():
    emb, _ = make_batch(6, 20, seed=3)
    labels = torch.tensor([1, 4, 9, 12, 15, 4])
    pfc = PartialFC(CombinedMarginLoss(S, 1.0, 0.0, 0.4), D, 20, sample_rate=0.1).double()
    got = run_pfc(pfc, emb, labels)
    assert pfc.sampled_index.tolist() == [1, 4, 9, 12, 15]
    ref = run_reference(pfc.weight, emb, labels, (1.0, 0.0, 0.4), False, index=pfc.sampled_index)
    assert_close(got[0], ref[0])


@pytest.mark.parametrize("bad", [13, -1, 100])
def test_label_out_of_range_raises(bad):
    pfc = PartialFC(CombinedMarginLoss(S, 1.0, 0.5, 0.0), D, NUM_CLASSES)
    labels = torch.tensor([0, 5, bad, 2])
    with pytest.raises(ValueError, match=rf"label {bad}\b.*num_classes=13"):
        pfc(torch.randn(4, D), labels)


def test_bad_arguments_raise():
    margin = CombinedMarginLoss(S, 1.0, 0.5, 0.0)
    with pytest.raises(ValueError, match="sample_rate"):
        PartialFC(margin, D, NUM_CLASSES, sample_rate=0.0)
    with pytest.raises(ValueError, match="num_classes"):
        PartialFC(margin, D, 0)
    with pytest.raises(ValueError, match="margin_loss"):
        PartialFC("arcface", D, NUM_CLASSES)
    pfc = PartialFC(margin, D, NUM_CLASSES)
    with pytest.raises(ValueError, match="local_labels"):
        pfc(torch.randn(4, D), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="local_embeddings"):
        pfc(torch.randn(4, D + 1), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="integers"):
        pfc(torch.randn(4, D), torch.tensor([0.0, 1.0, 2.0, 3.0]))


def test_dist_cross_entropy_single_rank_gradcheck():
    gen = torch.Generator().manual_seed(8)
    logits = (torch.randn(5, 7, dtype=torch.float64, generator=gen) * 20).requires_grad_(True)
    labels = torch.tensor([0, 6, 3, 3, 1])
    loss = dist_softmax_cross_entropy(logits, labels)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))
    assert torch.autograd.gradcheck(lambda z: dist_softmax_cross_entropy(z, labels), (logits,))


def test_logits_stay_fp32_under_outer_cpu_autocast():
    emb, labels = make_batch(6, NUM_CLASSES, seed=9)
    pfc = PartialFC(CombinedMarginLoss(S, 1.0, 0.5, 0.0), D, NUM_CLASSES)
    plain = pfc(emb.float(), labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = pfc(emb.float(), labels)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, plain, rtol=1e-6, atol=1e-6)


def test_batch_size_may_change_between_calls():
    pfc = PartialFC(CombinedMarginLoss(S, 1.0, 0.5, 0.0), D, NUM_CLASSES).double()
    for n in (4, 7):
        emb, labels = make_batch(n, NUM_CLASSES, seed=n)
        got = run_pfc(pfc, emb, labels)
        ref = run_reference(pfc.weight, emb, labels, (1.0, 0.5, 0.0), True)
        assert_close(got[0], ref[0])
        pfc.weight.grad = None


# ----------------------------------------------------------------------------- two ranks, gloo


def _worker(rank, world_size, port, inputs_path, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        inputs = torch.load(inputs_path)
        emb, labels = inputs["emb"], inputs["labels"]
        b = emb.shape[0] // world_size
        local_emb, local_labels = emb[rank * b : (rank + 1) * b], labels[rank * b : (rank + 1) * b]
        out = {}
        for name, margins, exact, rate in inputs["cases"]:
            pfc = PartialFC(
                CombinedMarginLoss(S, *margins, exact_grad=exact),
                D,
                NUM_CLASSES,
                sample_rate=rate,
                seed=11,
            ).double()
            out[name + "/init"] = pfc.weight.detach().clone()
            out[name + "/result"] = run_pfc(pfc, local_emb, local_labels)
            if pfc.sampled_index is not None:
                out[name + "/index"] = pfc.sampled_index + pfc.class_start
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_gloo_equal_one_rank(tmp_path):
    world_size = 2
    emb, labels = make_batch(12, NUM_CLASSES, seed=4)
    cases = [
        ("arc_exact", (1.0, 0.5, 0.0), True, 1.0),
        ("combined_st", (0.9, 0.3, 0.1), False, 1.0),
        ("arc_sampled", (1.0, 0.5, 0.0), True, 0.5),
    ]
    torch.save({"emb": emb, "labels": labels, "cases": cases}, tmp_path / "inputs.pt")
    mp.spawn(
        _worker,
        args=(world_size, free_port(), str(tmp_path / "inputs.pt"), str(tmp_path)),
        nprocs=world_size,
        join=True,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    for name, margins, exact, rate in cases:
        init = torch.cat([r[name + "/init"] for r in ranks])
        single = PartialFC(CombinedMarginLoss(S, *margins), D, NUM_CLASSES, seed=11)
        assert torch.equal(init, single.weight.detach())
        assert [r[name + "/init"].shape[0] for r in ranks] == [7, 6]

        index = None
        if rate < 1.0:
            index = torch.cat([r[name + "/index"] for r in ranks])
            assert set(labels.tolist()) <= set(index.tolist())
        ref = run_reference(init.double(), emb, labels, margins, not exact, index=index)

        losses = [r[name + "/result"][0] for r in ranks]
        assert_close(losses[0], ref[0])
        assert_close(losses[1], ref[0])
        # Each rank's embedding gradient is world_size × dL/de_local, so that DDP's gradient
        # averaging yields the gradient of the global-batch mean loss.
        emb_grad = torch.cat([r[name + "/result"][1] for r in ranks]) / world_size
        assert_close(emb_grad, ref[1])
        weight_grad = torch.cat([r[name + "/result"][2] for r in ranks])
        assert_close(weight_grad, ref[2])


def test_margin_and_loss_read_nothing_on_the_host():
    # Host syncs on a GPU come from ops whose output size or value the host must know:
    # nonzero (index lists) and _local_scalar_dense (.item(), .tolist(), bool()). The margin and
    # the sharded cross-entropy must use neither, forward or backward.
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.__name__)
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    cos = (torch.rand(6, 5, generator=g) * 2 - 1).requires_grad_()
    labels = torch.tensor([0, -1, 3, 4, -1, 1])  # -1: the class is on another rank
    margin = CombinedMarginLoss(64.0, 1.0, 0.5, 0.0, interclass_filtering_threshold=0.2)
    with Record():
        loss = dist_softmax_cross_entropy(margin(cos, labels), labels)
        loss.backward()
    syncing = {name for name in seen if name.startswith(("nonzero", "_local_scalar_dense"))}
    assert not syncing, syncing
    assert torch.isfinite(cos.grad).all()
