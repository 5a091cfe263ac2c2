"""The fused BatchNorm2d + PReLU (``otface.backbones.fused_bn_prelu``) against the modules.

References: ``F.prelu(nn.BatchNorm2d(...)(x), weight)`` on deep copies of the modules (same
side effects on the running statistics), and a float64 computation written out here. The
kernels run compiled on CUDA tensors where a GPU is present, else by Triton's interpreter on
CPU tensors (``TRITON_INTERPRET=1``, set before anything imports triton, and only without a
GPU so that a GPU run tests the compiled kernels).
"""

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from _spawn import run_without_triton_interpreter
from torch import nn

# Before anything imports triton: its jit decides at decoration time whether to interpret.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from otface.backbones import fused_bn_prelu as fbp  # noqa: E402
from otface.backbones import get_model, set_fused_bn_prelu  # noqa: E402
from otface.backbones.fused_bn_prelu import bn_prelu  # noqa: E402

CL = torch.channels_last


def _interpreter_runs_runtime_loops() -> bool:
    """Whether Triton's interpreter can run ``for t in range(n)`` with ``n`` a kernel argument,
    as the statistics kernels do. Triton 3.6's interpreter turns ``n`` into a one-element array
    and calls ``int()`` on it, which NumPy 2.4 refuses; newer Triton, and compiled kernels on a
    GPU, are not affected."""
    if DEVICE != "cpu":
        return True
    import triton
    import triton.language as tl

    @triton.jit
    def _count(out_ptr, n):
        total = tl.zeros([2], tl.float32)
        for _ in range(n):
            total += 1.0
        tl.store(out_ptr + tl.arange(0, 2), total)

    out = torch.zeros(2)
    try:
        _count[(1,)](out, 3)
    except Exception:  # the interpreter wraps the TypeError in its own error type
        return False
    return out.tolist() == [3.0, 3.0]


needs_kernels = pytest.mark.skipif(
    not _interpreter_runs_runtime_loops(),
    reason="this Triton's interpreter cannot run loops with a runtime bound under this NumPy "
    "(int() of a one-element array); upgrade triton to run the kernels on the CPU",
)


def _modules(c, *, num_alpha=None, seed=0, momentum=0.1, dtype=torch.float32):
    """A BatchNorm2d and a PReLU with non-default parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c, momentum=momentum)
    prelu = nn.PReLU(c if num_alpha is None else num_alpha)
    with torch.no_grad():
        bn.weight.copy_(0.5 + torch.rand(c, generator=g))
        bn.bias.copy_(torch.randn(c, generator=g) * 0.5)
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(0.5 + torch.rand(c, generator=g))
        prelu.weight.copy_(0.1 + 0.4 * torch.rand(prelu.weight.shape, generator=g))
    return bn.to(DEVICE, dtype), prelu.to(DEVICE, dtype)


def _input(shape, *, seed=0, dtype=torch.float32, scale=2.0, offset=0.5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset
    return x.to(DEVICE, dtype).contiguous(memory_format=CL)


def _run(fn, x, bn, prelu, dy):
    """Output and the gradients of x, bn.weight, bn.bias, prelu.weight for upstream dy."""
    x = x.detach().requires_grad_(True)
    y = fn(x, bn, prelu)
    y.backward(dy)
    return y.detach(), x.grad, bn.weight.grad, bn.bias.grad, prelu.weight.grad


def _triton(x, bn, prelu):
    return bn_prelu(x, bn, prelu, kernel="triton")


def _modules_ref(x, bn, prelu):
    return F.prelu(bn(x), prelu.weight)


def _float64(x, bn, prelu, dy):
    """Output, gradients and new running statistics written out in float64."""
    x = x.detach().double().requires_grad_(True)
    p = [t.detach().double().requires_grad_(True) for t in (bn.weight, bn.bias, prelu.weight)]
    gamma, beta, alpha = (t.view(1, -1, 1, 1) for t in p)
    mean = x.mean((0, 2, 3), keepdim=True)
    var = x.var((0, 2, 3), unbiased=False, keepdim=True)
    z = (x - mean) / torch.sqrt(var + bn.eps) * gamma + beta
    y = torch.where(z > 0, z, alpha * z)
    y.backward(dy.double())
    m = x.numel() // x.shape[1]
    f = bn.momentum
    run_mean = (1 - f) * bn.running_mean.double() + f * mean.detach().flatten()
    run_var = (1 - f) * bn.running_var.double() + f * var.detach().flatten() * m / (m - 1)
    return (y.detach(), x.grad, *(t.grad for t in p)), (run_mean, run_var)


def _assert_near(actual, expected, tol, what):
    """``|actual - expected| <= tol * max(1, max|expected|)``, in float64."""
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(1.0, expected.double().abs().max().item())
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} x {scale:.3g}"


NAMES = ("y", "dx", "d_gamma", "d_beta", "d_alpha")

# (N, C, H, W): odd C, C = 64 (one full channel block), C = 100 (a full and a partial one), M
# never a multiple of a tile; each shape is reduced in several chunks, one in chunks of two
# tiles (see the next test).
SHAPES = [(4, 5, 13, 11), (3, 64, 15, 13), (2, 100, 5, 7), (4, 3, 16, 17)]


def test_shapes_cover_chunks_channel_blocks_and_partial_tiles():
    # Guards the tests below: their shapes must exercise the chunk merge, several channel
    # blocks and masked rows, or a bug there could go unseen.
    device = torch.device(DEVICE)
    cfgs = [fbp._launch_config(n * h * w, c, device) for n, c, h, w in SHAPES]
    if DEVICE == "cpu":
        assert all(cfg.n_chunks > 1 for cfg in cfgs)
        assert any(cfg.tiles > 1 for cfg in cfgs)  # tiles merged within a chunk
    assert any(cfg.c_blocks > 1 and c % cfg.block_c for cfg, (_, c, _, _) in zip(cfgs, SHAPES))
    for cfg, (n, _, h, w) in zip(cfgs, SHAPES):
        assert (n * h * w) % cfg.block_m and cfg.n_chunks * cfg.rows_per_chunk >= n * h * w


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_the_modules_and_float64(shape):
    bn, prelu = _modules(shape[1], seed=1)
    bn_ref, prelu_ref = copy.deepcopy(bn), copy.deepcopy(prelu)
    x = _input(shape, seed=2)
    dy = _input(shape, seed=3, scale=1.0, offset=0.0)
    expected64, (run_mean64, run_var64) = _float64(x, bn, prelu, dy)
    fast = _run(_triton, x, bn, prelu, dy)
    ref = _run(_modules_ref, x, bn_ref, prelu_ref, dy)
    assert fast[0].dtype == x.dtype and fast[0].is_contiguous(memory_format=CL)
    assert fast[1].is_contiguous(memory_format=CL)
    for name, a, b, c in zip(NAMES, fast, ref, expected64):
        _assert_near(a, b, 2e-5, f"{name} vs modules")
        _assert_near(a, c, 2e-5, f"{name} vs float64")
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var, rtol=1e-5, atol=1e-6)
    _assert_near(bn.running_var, run_var64, 1e-6, "running_var vs float64")
    _assert_near(bn.running_mean, run_mean64, 1e-6, "running_mean vs float64")
    assert bn.num_batches_tracked.item() == bn_ref.num_batches_tracked.item() == 1


@needs_kernels
def test_large_offset_channel_and_all_negative_channel():
    # Channel 0: mean 100, std 1, where sum(x^2) - sum(x)^2 / M in float32 loses the variance;
    # channel 1: beta = -8 puts every z below 0, so all of y is alpha * z and d_alpha is large.
    shape = (8, 4, 32, 40)  # five chunks of two tiles on CPU
    bn, prelu = _modules(4, seed=4)
    x = _input(shape, seed=5, scale=1.0, offset=0.0)
    x[:, 0] += 100.0
    with torch.no_grad():
        bn.bias[1] = -8.0
    dy = _input(shape, seed=6, scale=1.0, offset=0.0)
    expected64, (_, run_var64) = _float64(x, bn, prelu, dy)
    assert (expected64[0][:, 1] < 0).all()
    fast = _run(_triton, x, bn, prelu, dy)
    for name, a, c in zip(NAMES, fast, expected64):
        _assert_near(a, c, 2e-5, f"{name} vs float64")
    _assert_near(bn.running_var, run_var64, 1e-6, "running_var vs float64")
    # The tolerance has teeth: with one-pass float32 moments, sum(x^2)/M - mean^2, channel 0's
    # output would miss it.
    x0 = x[:, 0].double()
    xf = x0.float().flatten()
    naive_var = ((xf * xf).sum() / xf.numel() - (xf.sum() / xf.numel()) ** 2).double()
    gamma, beta = bn.weight[0].double(), bn.bias[0].double()
    z0 = (x0 - x0.mean()) / torch.sqrt(naive_var + bn.eps) * gamma + beta
    naive_y0 = torch.where(z0 > 0, z0, prelu.weight[0].double() * z0)
    with pytest.raises(AssertionError, match="max error"):
        _assert_near(naive_y0, expected64[0][:, 0], 2e-5, "y from one-pass moments")


@needs_kernels
def test_prelu_gradient_at_zero_follows_torch():
    # Quarter-integers symmetric about 0 sum exactly to 0 in any order; with beta = 0 the
    # zeros of x give z = 0 exactly, where torch's PReLU passes alpha * dy (z > 0 is false)
    # and no weight gradient.
    shape = (2, 3, 4, 5)
    bn, prelu = _modules(3, seed=23)
    with torch.no_grad():
        bn.bias.zero_()
    half = torch.round(_input((1, 3, 4, 5), seed=24) * 4) / 4
    half[:, :, 0] = 0.0
    x = torch.cat([half, -half]).contiguous(memory_format=CL)
    assert (x == 0).sum() >= 2 * 3 * 5
    dy = _input(shape, seed=25, scale=1.0, offset=0.0)
    fast = _run(_triton, x, bn, prelu, dy)
    ref = _run(_modules_ref, x, copy.deepcopy(bn), copy.deepcopy(prelu), dy)
    for name, a, b in zip(NAMES, fast, ref):
        _assert_near(a, b, 2e-5, name)


@needs_kernels
def test_float16_activation_with_float32_parameters():
    # As under CUDA autocast: float16 conv output, float32 BatchNorm and PReLU parameters;
    # output and dx in float16, parameter gradients in float32.
    shape = (2, 24, 9, 7)
    bn, prelu = _modules(24, seed=7)
    x = _input(shape, seed=8, dtype=torch.float16)
    dy = _input(shape, seed=9, scale=1.0, offset=0.0, dtype=torch.float16)
    expected64, (run_mean64, run_var64) = _float64(x, bn, prelu, dy)
    fast = _run(_triton, x, bn, prelu, dy)
    assert [t.dtype for t in fast] == [torch.float16] * 2 + [torch.float32] * 3
    # float16 keeps 11 bits: 2e-3 relative on y and dx; the float32 sums are tighter.
    for name, a, c, tol in zip(NAMES, fast, expected64, (2e-3, 2e-3, 1e-4, 1e-4, 1e-4)):
        _assert_near(a, c, tol, f"{name} vs float64")
    _assert_near(bn.running_mean, run_mean64, 1e-5, "running_mean")
    _assert_near(bn.running_var, run_var64, 1e-5, "running_var")


@needs_kernels
def test_shared_prelu_weight_and_contiguous_nchw_input():
    shape = (3, 6, 5, 9)
    bn, prelu = _modules(6, num_alpha=1, seed=10)
    bn_ref, prelu_ref = copy.deepcopy(bn), copy.deepcopy(prelu)
    x = _input(shape, seed=11).contiguous()
    dy = _input(shape, seed=12, scale=1.0, offset=0.0)
    fast = _run(_triton, x, bn, prelu, dy)
    ref = _run(_modules_ref, x, bn_ref, prelu_ref, dy)
    assert fast[0].is_contiguous() and fast[1].is_contiguous()
    assert fast[4].shape == (1,)
    for name, a, b in zip(NAMES, fast, ref):
        _assert_near(a, b, 2e-5, name)


@needs_kernels
def test_momentum_none_is_a_cumulative_average_over_steps():
    shape = (2, 5, 6, 7)
    bn, prelu = _modules(5, seed=13, momentum=None)
    bn_ref, bn_momentum = copy.deepcopy(bn), copy.deepcopy(bn)
    bn_momentum.momentum = 0.1
    for step in range(3):
        x = _input(shape, seed=20 + step, offset=step)
        with torch.no_grad():
            bn_prelu(x, bn, prelu, kernel="triton")
            bn_ref(x)
            bn_momentum(x)
    assert bn.num_batches_tracked.item() == 3
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var, rtol=1e-5, atol=1e-6)
    # A fixed momentum would have given something else: the counter was read.
    assert (bn.running_mean - bn_momentum.running_mean).abs().max() > 0.1


@needs_kernels
def test_without_running_statistics():
    shape = (2, 5, 6, 7)
    _, prelu = _modules(5, seed=14)
    bn = nn.BatchNorm2d(5, track_running_stats=False).to(DEVICE)
    x, dy = _input(shape, seed=15), _input(shape, seed=16, scale=1.0, offset=0.0)
    fast = _run(_triton, x, bn, prelu, dy)
    ref = _run(_modules_ref, x, copy.deepcopy(bn), copy.deepcopy(prelu), dy)
    assert bn.running_mean is None and bn.num_batches_tracked is None
    for name, a, b in zip(NAMES, fast, ref):
        _assert_near(a, b, 2e-5, name)


def _count_kernel_calls(monkeypatch):
    calls = []
    real = fbp._BNPReLU.apply
    monkeypatch.setattr(fbp._BNPReLU, "apply", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.slow
@needs_kernels
def test_gradcheck_float64(monkeypatch):
    # The kernels accumulate in float64 for float64 input, so finite differences can check
    # the hand-written backward of x, gamma, beta and alpha.
    bn, prelu = _modules(3, seed=17, dtype=torch.float64)

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.prelu = bn, prelu

        def forward(self, x):
            return bn_prelu(x, self.bn, self.prelu, kernel="triton")

    pair = Pair()
    names = [name for name, _ in pair.named_parameters()]

    def fn(x, *params):
        return torch.func.functional_call(pair, dict(zip(names, params)), (x,))

    calls = _count_kernel_calls(monkeypatch)
    x = _input((2, 3, 3, 2), seed=18, dtype=torch.float64).requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in pair.parameters()]
    assert torch.autograd.gradcheck(fn, [x] + params, eps=1e-6, atol=1e-6)
    assert calls  # the kernels ran, not a fallback


def test_eval_mode_auto_on_cpu_and_torch_run_the_modules(monkeypatch):
    calls = _count_kernel_calls(monkeypatch)
    bn, prelu = _modules(4, seed=19)
    x = _input((2, 4, 5, 5), seed=20)
    bn_ref = copy.deepcopy(bn)
    eval_out = bn_prelu(x, bn.eval(), prelu, kernel="triton")
    torch.testing.assert_close(eval_out, F.prelu(bn_ref.eval()(x), prelu.weight), rtol=0, atol=0)
    assert bn.num_batches_tracked.item() == 0
    bn.train()
    bn_prelu(x, bn, prelu, kernel="torch")
    bn_prelu(x.cpu(), bn.cpu(), prelu.cpu(), kernel="auto")
    assert calls == []
    if DEVICE == "cuda":
        bn, prelu = bn.cuda(), prelu.cuda()
        bn_prelu(x.half(), bn, prelu, kernel="auto")
        assert calls == [1]


def test_what_it_does_not_take_is_named(monkeypatch):
    bn, prelu = _modules(4)
    x = _input((2, 4, 5, 5))
    with pytest.raises(ValueError, match="'auto', 'triton', 'torch'; got 'cuda'"):
        bn_prelu(x, bn, prelu, kernel="cuda")
    model = get_model("r18_lite")
    with pytest.raises(ValueError, match="'off', 'auto', 'triton', 'torch'; got 'on'"):
        set_fused_bn_prelu(model, "on")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        bn_prelu(x.cpu(), bn.cpu(), prelu.cpu(), kernel="triton")
    monkeypatch.setattr(fbp, "available", lambda: False)
    with pytest.raises(ValueError, match="pip install triton"):
        bn_prelu(x, bn, prelu, kernel="triton")


def _step(model, x, weights):
    model.zero_grad(set_to_none=True)
    emb = model(x.to(weights.dtype))
    (emb * weights).sum().backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    return emb.detach(), grads


def _worst_error(result, reference):
    """Largest error of the embedding and of any gradient, relative to max(1, max|ref|)."""

    def rel(a, b):
        return (a.double() - b).abs().max().item() / max(1.0, b.abs().max().item())

    (emb, grads), (emb_ref, grads_ref) = result, reference
    assert grads.keys() == grads_ref.keys()
    return max([rel(emb, emb_ref)] + [rel(grads[k], grads_ref[k]) for k in grads_ref])


@pytest.mark.slow
@needs_kernels
def test_iresnet_training_step_and_eval_with_the_fused_blocks(monkeypatch):
    torch.manual_seed(0)
    plain = get_model("r18_lite", num_features=64).to(DEVICE).to(memory_format=CL)
    # The embedding BatchNorm1d in training mode maps a batch of two to +-1 per feature, which
    # leaves the loss almost flat in the backbone; in eval mode it is affine.
    plain.features.eval()
    fused, plain64 = copy.deepcopy(plain), copy.deepcopy(plain).double()
    fused64 = copy.deepcopy(plain64)
    for model in (fused, fused64):
        assert set_fused_bn_prelu(model, "triton") == 5  # one block per stage, and the stem
    assert set_fused_bn_prelu(get_model("mbf"), "triton") == 0
    calls = _count_kernel_calls(monkeypatch)
    x = _input((2, 3, 112, 112), seed=21, scale=1.0, offset=0.0)
    weights = torch.randn(2, 64, generator=torch.Generator().manual_seed(22)).to(DEVICE)
    ref64 = _step(plain64, x, weights.double())
    # In float64 the fused blocks give the plain network's step to rounding.
    assert _worst_error(_step(fused64, x, weights.double()), ref64) < 1e-10
    # In float32 both differ from float64 by rounding grown through the network (measured
    # 3.4e-6 relative on the worst gradient for the plain blocks, 4.5e-6 for the fused ones);
    # the fused blocks may not add much to it.
    plain_error = _worst_error(_step(plain, x, weights), ref64)
    fused_error = _worst_error(_step(fused, x, weights), ref64)
    assert len(calls) == 10  # 5 a forward, fused and fused64
    assert fused_error < 3 * plain_error + 1e-6, (fused_error, plain_error)
    for model, ref in ((fused, plain), (fused64, plain64)):
        sd, sd_ref = model.state_dict(), ref.state_dict()
        assert [(k, v.shape) for k, v in sd.items()] == [(k, v.shape) for k, v in sd_ref.items()]
    for key, value in plain64.state_dict().items():  # running statistics, counters
        _assert_near(fused64.state_dict()[key], value, 1e-12, key)
    assert fused.layer1[0].bn2.num_batches_tracked.item() == 1
    assert fused.bn1.num_batches_tracked.item() == 1  # the stem
    # Eval mode runs the plain modules: with the same weights and running statistics (the
    # plain network's, loaded strictly), bitwise the same embedding, and no kernel launch.
    fused.load_state_dict(plain.state_dict(), strict=True)
    plain.eval(), fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), rtol=0, atol=0)
    assert len(calls) == 10
    # "off" restores the modules in training mode too.
    assert set_fused_bn_prelu(fused.train(), "off") == 5
    with torch.no_grad():
        fused(x)
    assert len(calls) == 10


@pytest.mark.slow
def test_importing_otface_does_not_import_triton():
    code = (
        "import sys, torch; before = 'triton' in sys.modules; "
        "import otface.backbones, otface.backbones.fused_bn_prelu; "
        "assert ('triton' in sys.modules) == before, 'otface imported triton'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


_COMPILE_FOR_SM90 = """
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from otface.backbones import _fused_bn_prelu_kernel as k
from otface.backbones.fused_bn_prelu import _NUM_WARPS

INTS = {"M", "C", "TILES", "n_chunks", "rows_per_chunk", "alpha_stride"}
ACTIVATIONS = {"x_ptr", "y_ptr", "dy_ptr", "dx_ptr"}
PARAMS = {"gamma_ptr", "beta_ptr", "alpha_ptr", "run_mean_ptr", "run_var_ptr"}

def arg_type(name, act, acc):
    if name in ACTIVATIONS: return "*" + act
    if name in PARAMS: return "*fp32"
    if name == "nbt_ptr": return "*i64"
    if name.endswith("_ptr"): return "*" + acc
    if name in INTS: return "i32"
    return "fp64" if name in ("eps", "momentum") else "constexpr"

for act, acc, acc_t in (("fp16", "fp32", tl.float32), ("fp64", "fp64", tl.float64)):
    for kernel in (k.stats_partial_kernel, k.stats_finalize_kernel, k.fwd_elementwise_kernel,
                   k.bwd_reduce_kernel, k.bwd_elementwise_kernel):
        sig = {name: arg_type(name, act, acc) for name in kernel.arg_names}
        const = {"BLOCK_M": 64, "BLOCK_C": 64, "ACC": acc_t}
        if kernel is k.stats_finalize_kernel:
            const = {"BLOCK_K": 1024, "BLOCK_C": 4, "UPDATE_RUNNING": True,
                     "CUMULATIVE": True, "ACC": acc_t}
        src = ASTSource(kernel, sig, constexprs=const)
        out = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": _NUM_WARPS})
        assert out.asm["cubin"]
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu():
    # The interpreter does not check what only the GPU compiler does (layouts, dtypes of
    # math functions, loop-carried types): compile all five kernels for an H100/H200 (sm_90)
    # with the wheel's ptxas, float16 activations and float64, TRITON_INTERPRET unset.
    run_without_triton_interpreter(_COMPILE_FOR_SM90)
