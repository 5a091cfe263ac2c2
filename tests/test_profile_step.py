"""benchmarks/profile_step.py: where a step's time goes, by kind of kernel."""

import json
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import profile_step  # noqa: E402


@pytest.mark.parametrize(
    "name, category",
    [
        # cuDNN's layout transpose has "cudnn" in its name but is not a convolution.
        (
            "void cudnn::engines_precompiled::nchwToNhwcKernel<__half, __half, float, false, "
            "true, (cudnnKernelDataType_t)0>(cudnn::engines_precompiled::nchw2nhwc_params_t<float>"
            ", __half const*, __half*)",
            "layout transpose",
        ),
        # A cuDNN convolution is an implicit GEMM: a convolution, not a GEMM.
        (
            "sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_"
            "warpgroupsize1x1x1_g1_execute_segment_k_off_kernel__5x_cudnn",
            "convolution",
        ),
        ("sm90_xmma_dgrad_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc", "convolution"),
        ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "gemm"),
        (
            "void at::native::batch_norm_collect_statistics_channels_last_kernel<at::native::Var"
            ", c10::Half, float, 4>(c10::Half const*, int, int, float*, float*, int*)",
            "batchnorm",
        ),
        # TensorIterator kernels carry the op in a lambda's name.
        (
            "void at::native::vectorized_elementwise_kernel<4, at::native::(anonymous namespace)"
            "::prelu_kernel(at::TensorIterator&)::{lambda()#1}::operator()() const",
            "prelu",
        ),
        (
            "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::"
            "Half>, std::array<char*, 3ul> >(int, at::native::CUDAFunctor_add<c10::Half>)",
            "elementwise",
        ),
        (
            "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::"
            "(anonymous namespace)::TensorListMetadata<3>, at::native::(anonymous namespace)::"
            "FusedSgdMathFunctor<float, 3>, double>(...)",
            "optimizer",
        ),
        ("triton_poi_fused__native_batch_norm_legit_functional_add_0", "inductor (Triton)"),
        ("ncclDevKernel_AllReduce_Sum_f16_RING_LL", "nccl"),
        ("sinkhorn_kernel", "sinkhorn (ours, Triton)"),
        ("fwd_elementwise_kernel", "bn+prelu (ours, Triton)"),
        ("aten::cudnn_convolution", "convolution"),
        ("aten::native_batch_norm_backward", "batchnorm"),
        ("some_unknown_thing", "other"),
    ],
)
def test_kernel_names_fall_in_their_category(name, category):
    assert profile_step.categorize(name) == category


def test_categories_sum_what_they_hold():
    E = profile_step.Entry
    entries = [E("aten::convolution_backward", 30.0, 2), E("aten::mkldnn_convolution", 10.0, 2)]
    entries += [E("aten::native_batch_norm", 5.0, 4), E("mystery", 1.0, 1)]
    table = profile_step.by_category(entries)
    assert list(table) == ["convolution", "batchnorm", "other"]  # largest first
    assert table["convolution"] == (40.0, 4)
    assert table["other"] == (1.0, 1)


@pytest.mark.slow
def test_profile_of_a_cpu_step(tmp_path, capsys):
    trace = tmp_path / "step.json"
    profile_step.main(
        "--device cpu --network r18_lite --batch-size 8 --k 2 --num-classes 20 --loss otface "
        f"--steps 1 --warmup 1 --top 5 --trace {trace}".split()
    )
    text = capsys.readouterr().out
    assert "r18_lite otface" in text and "wall per step (unprofiled)" in text
    rows = re.findall(r"^(\S[\w /+(),]*?)\s+([0-9.]+)\s+([0-9.]+)%\s+([0-9.]+)$", text, re.M)
    table = {name: float(share) for name, _, share, _ in rows}
    assert "convolution" in table and "batchnorm" in table
    assert sum(table.values()) == pytest.approx(100.0, abs=0.5)
    top = text.split("top 5 by time:")[1].split("trace:")[0].strip().splitlines()
    assert len(top) == 1 + 5  # header and five ops
    assert all(re.match(r"\s*[0-9.]+\s+[0-9.]+%\s+[0-9.]+\s+\S", row) for row in top[1:])
    assert json.loads(trace.read_text())  # a readable Chrome trace


def test_compare_lines_up_the_categories(capsys):
    E = profile_step.Entry
    ours = [E("aten::mkldnn_convolution", 6000.0, 2), E("aten::native_batch_norm", 2000.0, 2)]
    theirs = [E("aten::mkldnn_convolution", 9000.0, 2), E("aten::nchw_transpose", 1000.0, 2)]
    profile_step.compare(ours, theirs, steps=2)
    rows = {line.split()[0]: line.split()[-3:] for line in capsys.readouterr().out.splitlines()}
    assert rows["convolution"] == ["3.00", "4.50", "-1.50"]  # ms per step
    assert rows["batchnorm"] == ["1.00", "0.00", "+1.00"]
    assert rows["layout"] == ["0.00", "0.50", "-0.50"]  # "layout transpose"
    assert rows["all"] == ["4.00", "5.00", "-1.00"]


@pytest.mark.skipif(
    not os.environ.get("ARCFACE_TORCH"), reason="set ARCFACE_TORCH to an arcface_torch checkout"
)
def test_profile_beside_upstream_on_cpu(capsys):
    profile_step.main(
        "--device cpu --network mbf --batch-size 4 --k 2 --num-classes 50 --steps 1 --warmup 0 "
        f"--top 3 --arcface-torch {os.environ['ARCFACE_TORCH']}".split()
    )
    text = capsys.readouterr().out
    assert "starts from our initial weights" in text
    side = text.split("ours - upstream")[1]
    conv = re.search(r"^convolution\s+([0-9.]+)\s+([0-9.]+)\s+([+-][0-9.]+)$", side, re.M)
    assert conv and float(conv[1]) > 0 and float(conv[2]) > 0
    assert float(conv[3]) == pytest.approx(float(conv[1]) - float(conv[2]), abs=0.011)
