"""The fused Triton Sinkhorn kernel against the torch kernel of :func:`otface.ot.sinkhorn`
(same eps, tol, max_iter, check_every): compiled on CUDA tensors where a GPU is present, else
run by Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set here before anything
imports triton, and only without a GPU so that a GPU run tests the compiled kernel).

The Triton kernel stops each problem on its own, so with ``tol > 0`` each of its problems is
compared with the torch kernel solving that problem alone; with ``tol = 0`` (a fixed number
of iterations) with the torch kernel's batched solve. Problems above ``SMALL_MAX_SIZE`` (64)
go to the tiled kernel: checked at a ViT's 144 x 144 (and ragged, and with zero-weight
points, against POT too), and on small shapes by lowering ``SMALL_MAX_SIZE``.
"""

import os
import subprocess
import sys

import numpy as np
import ot
import pytest
import torch
from _spawn import run_without_triton_interpreter

# Before anything imports triton: its jit decides at decoration time whether to interpret.
# (Importing torch does not import triton.)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from otface.ot import (  # noqa: E402
    cosine_cost,
    entropic_objective,
    ot_distances,
    sinkhorn,
    triton_sinkhorn,
)
from otface.ot.marginals import error_rounding_bound, problem_marginal_errors  # noqa: E402

# The interpreter evaluates log(0) = -inf for padded rows with numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")

PLAN_ATOL = 1e-5


def _costs(batch, n, m, *, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, 16, generator=g)
    y = torch.randn(batch, m, 16, generator=g) + 0.5 * x.mean(1, keepdim=True)
    return cosine_cost(x, y).to(DEVICE)


def _assert_same_solve(fast, ref, i=None, j=None):
    """Problem ``i`` of ``fast`` against problem ``j`` of ``ref`` (all problems if None)."""
    sel = slice(None) if i is None else slice(i, i + 1)
    rsel = slice(None) if j is None else slice(j, j + 1)
    torch.testing.assert_close(fast.plan[sel], ref.plan[rsel], atol=PLAN_ATOL, rtol=0)
    torch.testing.assert_close(fast.cost[sel], ref.cost[rsel], atol=PLAN_ATOL, rtol=0)
    for p, q in zip(fast.potentials, ref.potentials):
        torch.testing.assert_close(p[sel], q[rsel], atol=1e-4, rtol=1e-5)


@pytest.mark.slow
def test_importing_otface_does_not_import_triton():
    code = (
        "import sys, torch; before = 'triton' in sys.modules; "
        "import otface.ot, otface.ot.sinkhorn, otface.ot.triton_sinkhorn, otface.loss; "
        "assert ('triton' in sys.modules) == before, 'otface imported triton'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


_COMPILE_FOR_SM90 = """
import re, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from otface.ot._triton_sinkhorn_kernel import sinkhorn_kernel, sinkhorn_tiled_kernel
from otface.ot.triton_sinkhorn import _TILE, _TILED_WARPS, _num_warps

def compile_sm90(kernel, const, num_warps):
    tuples = {
        "anneal": ("fp32", "i32", "fp32", "fp32"),  # eps_start, n_stages, scaling, eps
        "stop": ("fp32", "i32", "i32"),  # tol, max_iter, check_every
    }
    sig = {
        name: "*i8" if name == "sym_ptr" else "*i32" if name == "iters_ptr" else
        "*fp32" if name.endswith("_ptr") else "i32" if name in ("n", "m") else
        "fp32" if name in ("neg_inv_eps", "relaxation") else tuples.get(name, "constexpr")
        for name in kernel.arg_names
    }
    src = ASTSource(kernel, sig, constexprs=const)
    out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    assert out.asm["cubin"]
    return out

for block in (16, 64):
    const = {"BLOCK_N": block, "BLOCK_M": block, "HAS_SYM": True}
    compile_sm90(sinkhorn_kernel, const, _num_warps(block, block))
for sym in (True, False):
    const = {"TILE_N": _TILE, "TILE_M": _TILE, "HAS_SYM": sym}
    ptx = compile_sm90(sinkhorn_tiled_kernel, const, _TILED_WARPS).asm["ptx"]
    # The tiled kernel must not spill: ptxas run on its PTX as Triton runs it.
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        cmd = [get_ptxas(90).path, "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", f.name,
               "-o", f.name + ".o"]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    spills = [int(k) for k in re.findall(r"(\\d+) bytes spill", log)]
    assert spills and not any(spills), log
"""


@pytest.mark.slow
def test_kernel_compiles_for_sm90_without_a_gpu():
    # The interpreter does not check what only the GPU compiler does (layouts, the device
    # while loop, registers): compile for an H100/H200 (sm_90) with the wheel's ptxas, in a
    # process where TRITON_INTERPRET is unset.
    run_without_triton_interpreter(_COMPILE_FOR_SM90)


@pytest.mark.parametrize("shape", [(3, 7, 13), (2, 16, 16), (2, 1, 5)])
def test_fixed_iterations_equal_the_torch_batched_solve(shape):
    # Uneven n != m, an exact block (no padding) and a single source point; tol = 0 runs
    # exactly max_iter iterations in both.
    c = _costs(*shape, seed=1)
    kw = dict(eps=0.05, max_iter=20, tol=0.0)
    ref = sinkhorn(c, kernel="torch", **kw)
    fast = sinkhorn(c, kernel="triton", **kw)
    _assert_same_solve(fast, ref)
    assert ref.n_iter == 20 and int(fast.n_iter) == 20
    assert fast.problem_iters.tolist() == [20] * shape[0]
    assert fast.plan.dtype == torch.float32 and fast.problem_iters.dtype == torch.int32
    torch.testing.assert_close(fast.marginal_error, ref.marginal_error, atol=1e-6, rtol=1e-3)
    # The per-problem errors are the plans' L1 marginal errors, to the rounding bound the
    # solver states (the plans summed in float64: exactly, for this purpose).
    a = torch.full(shape[:2], 1 / shape[1], dtype=torch.float64, device=DEVICE)
    b = torch.full(shape[::2], 1 / shape[2], dtype=torch.float64, device=DEVICE)
    for res in (fast, ref):
        gap = (res.problem_errors - problem_marginal_errors(res.plan.double(), a, b)).abs()
        assert (gap <= error_rounding_bound(c, res.potentials, eps=0.05)).all()


def test_each_problem_stops_on_its_own_like_a_single_solve():
    # Problem 1 has a constant cost: its plan is a b^T after one iteration, so it stops at
    # the first check while the others run on; each gets what the torch kernel gives it alone.
    c = _costs(3, 6, 9, seed=2)
    c[1] = 0.7
    kw = dict(eps=0.1, max_iter=60, tol=1e-4, check_every=3)
    fast = sinkhorn(c, kernel="triton", **kw)
    iters = fast.problem_iters.tolist()
    for i in range(3):
        alone = sinkhorn(c[i : i + 1], kernel="torch", **kw)
        _assert_same_solve(fast, alone, i, 0)
        assert iters[i] == alone.n_iter
    assert iters[1] == 3 and min(iters[0], iters[2]) > 3
    assert all(k % 3 == 0 for k in iters)
    # The batch-wide count is the slowest problem's, as in the torch kernel's batched solve.
    batched = sinkhorn(c, kernel="torch", **kw)
    assert int(fast.n_iter) == batched.n_iter == max(iters)
    assert fast.marginal_error.item() < 1e-4


def test_given_marginals():
    c = _costs(2, 5, 7, seed=3)
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 5, generator=g) + 0.1, torch.rand(7, generator=g) + 0.1
    a, b = (a / a.sum(-1, keepdim=True)).to(DEVICE), (b / b.sum()).to(DEVICE)
    kw = dict(a=a, b=b, eps=0.1, max_iter=25, tol=0.0)
    _assert_same_solve(sinkhorn(c, kernel="triton", **kw), sinkhorn(c, kernel="torch", **kw))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_cost_is_solved_in_float32(dtype):
    # As the torch path: the kernel reads the 16-bit cost and solves in float32.
    c = _costs(2, 5, 6, seed=10).to(dtype)
    kw = dict(eps=0.1, max_iter=15, tol=0.0)
    fast = sinkhorn(c, kernel="triton", **kw)
    assert fast.plan.dtype == torch.float32 and fast.cost.dtype == torch.float32
    _assert_same_solve(fast, sinkhorn(c.float(), kernel="torch", **kw))


def test_nan_problem_does_not_hold_up_the_others():
    c = _costs(3, 5, 6, seed=4)
    c[1, 2, 3] = float("nan")
    kw = dict(eps=0.1, max_iter=60, tol=1e-4, check_every=2)
    fast = sinkhorn(c, kernel="triton", **kw)
    assert torch.isnan(fast.plan[1]).all() and torch.isnan(fast.cost[1])
    for i in (0, 2):
        _assert_same_solve(fast, sinkhorn(c[i : i + 1], kernel="torch", **kw), i, 0)
    assert fast.problem_iters[1].item() == 2  # stopped at its first check
    ref = sinkhorn(c[[0, 2]], kernel="torch", **kw)
    assert int(fast.n_iter) == ref.n_iter < 60
    assert torch.isfinite(fast.marginal_error)
    assert 0 < fast.marginal_error.item() < 1e-4


def test_infinite_cost_entry_carries_no_mass():
    c = _costs(2, 5, 6, seed=5)
    c[0, 1, 2] = float("inf")
    kw = dict(eps=0.1, max_iter=20, tol=0.0)
    fast = sinkhorn(c, kernel="triton", **kw)
    assert fast.plan[0, 1, 2].item() == 0.0 and torch.isfinite(fast.cost).all()
    _assert_same_solve(fast, sinkhorn(c, kernel="torch", **kw))


def test_symmetric_self_problems_in_the_same_launch():
    # Self-problems take averaged updates in the kernel too; the cross problem plain ones.
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 6, 16, generator=g)
    x[2] += 0.8 * x[0]
    c = torch.cat([cosine_cost(x[:2], x[:2]), cosine_cost(x[:1], x[2:3])]).to(DEVICE)
    mask = torch.tensor([True, True, False], device=DEVICE)
    kw = dict(eps=0.2, max_iter=100, tol=1e-5, check_every=1)
    fast = sinkhorn(c, kernel="triton", symmetric=mask, **kw)
    for i in range(3):
        alone = sinkhorn(c[i : i + 1], kernel="torch", symmetric=mask[i : i + 1], **kw)
        _assert_same_solve(fast, alone, i, 0)
        assert fast.problem_iters[i].item() == alone.n_iter
    assert fast.marginal_error.item() < 1e-5
    # Without the mask the self-problems oscillate and take many more iterations.
    plain = sinkhorn(c[:2], kernel="triton", **kw)
    assert (plain.problem_iters > 5 * fast.problem_iters[:2]).all()


def test_envelope_gradient_and_entropic_value():
    c = _costs(2, 4, 6, seed=7)
    kw = dict(eps=0.1, max_iter=30, tol=0.0)
    cf = c.clone().requires_grad_(True)
    fast = sinkhorn(cf, kernel="triton", **kw)
    value = entropic_objective(fast.plan, cf, eps=0.1, potentials=fast.potentials)
    (grad,) = torch.autograd.grad(fast.cost.sum() + value.sum(), cf)
    torch.testing.assert_close(grad, 2 * fast.plan)
    ref = sinkhorn(c, kernel="torch", **kw)
    expected = entropic_objective(ref.plan, c, eps=0.1, potentials=ref.potentials)
    torch.testing.assert_close(value.detach(), expected, atol=1e-5, rtol=0)


def test_auto_uses_the_kernel_only_where_it_fits(monkeypatch):
    c = _costs(2, 4, 5, seed=8)
    # CPU tensors: auto keeps the torch kernels, even under the interpreter.
    assert not triton_sinkhorn.auto_fits(c.cpu())
    # (the torch kernels count iterations on the host: an int, not the kernel's tensor)
    assert isinstance(sinkhorn(c.cpu(), eps=0.1, max_iter=5, tol=0.0).n_iter, int)
    if DEVICE == "cuda":
        assert triton_sinkhorn.auto_fits(c)
        assert not triton_sinkhorn.auto_fits(c.double())
        assert not triton_sinkhorn.auto_fits(torch.zeros(1, 65, 3, device=DEVICE))
        # ViT-size problems take the tiled kernel only when asked for (it is unmeasured).
        assert not triton_sinkhorn.auto_fits(torch.zeros(1, 144, 144, device=DEVICE))
    # Where it fits (as on CUDA), the divergence's cross and self problems go to one launch.
    launches = []
    real = triton_sinkhorn.sinkhorn_triton
    monkeypatch.setattr(triton_sinkhorn, "auto_fits", lambda cost: True)
    monkeypatch.setattr(
        triton_sinkhorn,
        "sinkhorn_triton",
        lambda cost, *args, **kw: launches.append(cost.shape[0]) or real(cost, *args, **kw),
    )
    g = torch.Generator().manual_seed(9)
    points = torch.randn(3, 5, 8, generator=g).to(DEVICE)
    src, tgt = torch.tensor([0, 1], device=DEVICE), torch.tensor([1, 2], device=DEVICE)
    kw = dict(distance="divergence", eps=0.1, max_iter=15, tol=0.0)
    fast = ot_distances(points, src, tgt, **kw)
    assert launches == [5]  # 2 pairs + 3 distinct self-problems
    monkeypatch.setattr(triton_sinkhorn, "auto_fits", lambda cost: False)
    ref = ot_distances(points, src, tgt, **kw)
    assert launches == [5]
    torch.testing.assert_close(fast.value, ref.value, atol=1e-5, rtol=0)


def test_what_it_does_not_take_is_named(monkeypatch):
    c = _costs(1, 4, 4)
    kw = dict(eps=0.1, max_iter=5, tol=0.0, kernel="triton")
    with pytest.raises(ValueError, match="float32"):
        sinkhorn(c.double(), **kw)
    with pytest.raises(ValueError, match="n, m <= 256"):
        sinkhorn(torch.zeros(1, 257, 3, device=DEVICE), **kw)
    with pytest.raises(ValueError, match="'auto', 'torch', 'matmul', 'triton'"):
        sinkhorn(c, eps=0.1, max_iter=5, tol=0.0, kernel="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        sinkhorn(c.cpu(), **kw)
    monkeypatch.setattr(triton_sinkhorn, "available", lambda: False)
    with pytest.raises(ValueError, match="pip install triton"):
        sinkhorn(c, **kw)


@pytest.mark.parametrize("shape", [(3, 7, 13), (2, 16, 16)])
def test_eps_scaling_matches_the_torch_kernel(shape):
    # Fixed iterations (tol 0): the annealing iterations and the carried potentials must be
    # the torch path's, problem by problem.
    c = _costs(*shape, seed=5)
    kw = dict(eps=0.05, max_iter=12, tol=0.0, eps_scaling=0.5, cost_range=2.0)
    ref = sinkhorn(c, kernel="torch", **kw)
    fast = sinkhorn(c, kernel="triton", **kw)
    _assert_same_solve(fast, ref)
    assert ref.n_iter == 12 and fast.problem_iters.tolist() == [12] * shape[0]


def test_eps_scaling_with_symmetric_problems_and_early_stops():
    # Self-problems (averaged updates) beside cross problems, each stopping on its own.
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 9, 16, generator=g)
    c = torch.cat([cosine_cost(x, x.flip(0)), cosine_cost(x, x)]).to(DEVICE)
    sym = torch.tensor([False] * 3 + [True] * 3, device=DEVICE)
    kw = dict(eps=0.05, max_iter=200, tol=1e-4, check_every=2, eps_scaling=0.7, cost_range=2.0)
    fast = sinkhorn(c, kernel="triton", symmetric=sym, **kw)
    for i in range(6):
        alone = sinkhorn(c[i : i + 1], kernel="torch", symmetric=sym[i : i + 1], **kw)
        _assert_same_solve(fast, alone, i, 0)
        assert fast.problem_iters[i].item() == alone.n_iter


def test_over_relaxation_matches_the_torch_kernel_problem_by_problem():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 9, 16, generator=g)
    c = torch.cat([cosine_cost(x, x.flip(0)), cosine_cost(x, x)]).to(DEVICE)
    sym = torch.tensor([False] * 3 + [True] * 3, device=DEVICE)
    # Fixed iterations (no checks, so no safeguard): the same relaxed updates, to rounding.
    kw = dict(eps=0.05, max_iter=20, tol=0.0, relaxation=1.6)
    _assert_same_solve(
        sinkhorn(c, kernel="triton", symmetric=sym, **kw),
        sinkhorn(c, kernel="torch", symmetric=sym, **kw),
    )
    # With checks, relaxed cross problems and averaged self-problems in one launch each stop
    # (and fall back to plain updates) on their own. Where the safeguard compares two nearly
    # equal errors the two kernels can decide differently and take different paths to tol:
    # both end below tol, with plans within tol's reach of each other.
    for omega in (1.6, 1.95):
        kw = dict(eps=0.05, max_iter=400, tol=1e-4, check_every=1, relaxation=omega)
        fast = sinkhorn(c, kernel="triton", symmetric=sym, **kw)
        # The solver's promise: the error reported is the one its stop test compared with tol.
        assert (fast.problem_errors < 1e-4).all()
        for i in range(6):
            alone = sinkhorn(c[i : i + 1], kernel="torch", symmetric=sym[i : i + 1], **kw)
            torch.testing.assert_close(fast.plan[i], alone.plan[0], atol=5e-5, rtol=0)
            assert abs(fast.problem_iters[i].item() - alone.n_iter) <= 3


# The tiled kernel (n or m above SMALL_MAX_SIZE). The interpreter runs ~0.3 s an iteration at
# 144 x 144 for two problems: few iterations, two problems a batch.


def _weights(batch, size, *, zeros, seed):
    """Random positive weights summing to one, the first ``zeros[k]`` of problem k set to 0
    (tokens masked out), then shuffled."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(batch, size, generator=g) + 0.1
    for k, z in enumerate(zeros):
        w[k, :z] = 0.0
        w[k] = w[k, torch.randperm(size, generator=g)]
    return (w / w.sum(-1, keepdim=True)).to(DEVICE)


@pytest.mark.parametrize("shape", [(2, 144, 144), (2, 144, 100), (1, 256, 256)])
def test_tiled_kernel_at_vit_size_equals_the_torch_solve(shape):
    # 12 x 12 patch tokens against themselves and against a ragged set, and the largest size
    # taken; relaxed updates and eps-scaling in fixed iterations, then values and envelope
    # gradients.
    assert max(shape) > triton_sinkhorn.SMALL_MAX_SIZE
    c = _costs(*shape, seed=11)
    kw = dict(eps=0.05, max_iter=8, tol=0.0, relaxation=1.6, eps_scaling=0.5, cost_range=2.0)
    cf, cr = c.clone().requires_grad_(True), c.clone().requires_grad_(True)
    fast = sinkhorn(cf, kernel="triton", **kw)
    ref = sinkhorn(cr, kernel="torch", **kw)
    _assert_same_solve(fast, ref)
    assert fast.problem_iters.tolist() == [8] * shape[0]
    torch.testing.assert_close(fast.problem_errors, ref.problem_errors, atol=1e-6, rtol=1e-4)
    values = [
        entropic_objective(r.plan, x, eps=0.05, potentials=r.potentials)
        for r, x in ((fast, cf), (ref, cr))
    ]
    torch.testing.assert_close(values[0], values[1], atol=1e-5, rtol=0)
    (grad,) = torch.autograd.grad(fast.cost.sum() + values[0].sum(), cf)
    (grad_ref,) = torch.autograd.grad(ref.cost.sum() + values[1].sum(), cr)
    torch.testing.assert_close(grad, 2 * fast.plan)
    torch.testing.assert_close(grad, grad_ref, atol=2 * PLAN_ATOL, rtol=0)


# A zero weight's update computes (-inf) - (-inf) and then discards it (as the torch path does);
# the interpreter's numpy warns about it.
_ZERO_WEIGHT_NAN = "ignore:invalid value encountered in subtract:RuntimeWarning"


@pytest.mark.filterwarnings(_ZERO_WEIGHT_NAN)
def test_tiled_kernel_zero_weight_points_as_torch_and_pot():
    # Masked tokens get zero mass: their plan rows and columns are exactly 0, their potentials
    # -inf, each problem stops on its own as the torch kernel alone, and the rest of the plan
    # is POT's log-domain solution of the problem without those points.
    c = _costs(2, 144, 100, seed=12)
    a = _weights(2, 144, zeros=(30, 0), seed=13)
    b = _weights(2, 100, zeros=(0, 17), seed=14)
    kw = dict(a=a, b=b, eps=0.1, max_iter=60, tol=1e-6, check_every=1)
    fast = sinkhorn(c, kernel="triton", **kw)
    for i in range(2):
        one = dict(kw, a=a[i : i + 1], b=b[i : i + 1])
        alone = sinkhorn(c[i : i + 1], kernel="torch", **one)
        _assert_same_solve(fast, alone, i, 0)
        assert fast.problem_iters[i].item() == alone.n_iter < 60
        rows, cols = a[i] > 0, b[i] > 0
        assert (fast.plan[i][~rows] == 0).all() and (fast.plan[i][:, ~cols] == 0).all()
        assert torch.isneginf(fast.potentials[0][i][~rows]).all()
        assert torch.isneginf(fast.potentials[1][i][~cols]).all()
        # (renormalised in float64: float32 weights summing to 1 +- 1e-7 would leave POT an
        # unbalanced problem that it cannot solve to 1e-12)
        ai, bi = (w.double().cpu().numpy() for w in (a[i][rows], b[i][cols]))
        ai, bi = ai / ai.sum(), bi / bi.sum()
        ci = c[i][rows][:, cols].double().cpu().numpy()
        pot = ot.sinkhorn(ai, bi, ci, 0.1, method="sinkhorn_log", numItermax=10000, stopThr=1e-12)
        kept = fast.plan[i][rows][:, cols].double().cpu().numpy()
        np.testing.assert_allclose(kept, pot, atol=1e-7, rtol=0)
    assert fast.marginal_error.item() < 1e-6  # every problem stopped on tol


@pytest.mark.filterwarnings(_ZERO_WEIGHT_NAN)
def test_tiled_kernel_symmetric_masked_self_problem_beside_a_relaxed_cross_problem():
    # The divergence's self-problem of a masked token set (a = b with zeros, averaged updates)
    # beside a relaxed cross problem, with eps-scaling, each stopping on its own.
    g = torch.Generator().manual_seed(15)
    x = torch.randn(2, 72, 16, generator=g)
    c = torch.cat([cosine_cost(x[:1], x[:1]), cosine_cost(x[:1], x[1:])]).to(DEVICE)
    w = _weights(1, 72, zeros=(20,), seed=16).expand(2, -1)
    sym = torch.tensor([True, False], device=DEVICE)
    kw = dict(a=w, b=w, eps=0.05, max_iter=200, tol=1e-4, check_every=2)
    kw.update(relaxation=1.6, eps_scaling=0.7, cost_range=2.0)
    fast = sinkhorn(c, kernel="triton", symmetric=sym, **kw)
    for i in range(2):
        one = dict(kw, a=w[i : i + 1], b=w[i : i + 1], symmetric=sym[i : i + 1])
        alone = sinkhorn(c[i : i + 1], kernel="torch", **one)
        _assert_same_solve(fast, alone, i, 0)
        assert fast.problem_iters[i].item() == alone.n_iter < 200
    assert (fast.plan[:, w[0] == 0] == 0).all() and (fast.plan[:, :, w[0] == 0] == 0).all()


# (a NaN problem's potentials turn NaN, and with them whole slices of its tiles)
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
def test_tiled_kernel_nan_and_infinite_costs():
    # An infinite entry carries no mass; a NaN problem stops at its first check and does not
    # hold up the others.
    c = _costs(3, 70, 66, seed=17)
    c[0, 3, 4] = float("inf")
    c[1, 5, 6] = float("nan")
    kw = dict(eps=0.1, max_iter=60, tol=1e-4, check_every=2)
    fast = sinkhorn(c, kernel="triton", **kw)
    assert fast.plan[0, 3, 4].item() == 0.0 and torch.isfinite(fast.cost[[0, 2]]).all()
    assert torch.isnan(fast.plan[1]).all() and fast.problem_iters[1].item() == 2
    for i in (0, 2):
        alone = sinkhorn(c[i : i + 1], kernel="torch", **kw)
        _assert_same_solve(fast, alone, i, 0)
        assert fast.problem_iters[i].item() == alone.n_iter
    assert 0 < fast.marginal_error.item() < 1e-4


@pytest.mark.parametrize("shape", [(2, 1, 5), (3, 7, 13), (2, 33, 31)])
def test_tiled_kernel_on_small_shapes(monkeypatch, shape):
    # The tiled kernel made to take small problems too: a single point, one partial tile, and
    # one point past a tile. Fixed iterations and relaxed, then each problem stopping alone.
    monkeypatch.setattr(triton_sinkhorn, "SMALL_MAX_SIZE", 0)
    c = _costs(*shape, seed=18)
    kw = dict(eps=0.05, max_iter=12, tol=0.0, relaxation=1.6, eps_scaling=0.5, cost_range=2.0)
    _assert_same_solve(sinkhorn(c, kernel="triton", **kw), sinkhorn(c, kernel="torch", **kw))
    kw = dict(eps=0.1, max_iter=40, tol=1e-4, check_every=3)
    fast = sinkhorn(c, kernel="triton", **kw)
    for i in range(shape[0]):
        alone = sinkhorn(c[i : i + 1], kernel="torch", **kw)
        _assert_same_solve(fast, alone, i, 0)
        assert fast.problem_iters[i].item() == alone.n_iter
