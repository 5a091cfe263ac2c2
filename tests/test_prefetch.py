"""Device prefetcher: the batches it hands out equal the loader's, moved and normalised."""

import pytest
import torch

from otface.train.prefetch import DevicePrefetcher, to_training_layout


def _batches(n=3):
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randint(0, 256, (4, 3, 8, 8), generator=g, dtype=torch.uint8), torch.arange(4) + i)
        for i in range(n)
    ]


def test_uint8_is_normalised_to_minus_one_one_in_the_layout_asked():
    img = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    out, labels = to_training_layout(
        img.contiguous(), torch.tensor([1, 2]), torch.device("cpu"), channels_last=True
    )
    assert out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    # (x / 255 - 0.5) / 0.5, written out: 0 -> -1, 51 -> -0.6, 255 -> 1
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([-1.0, -0.6, 1.0]))
    assert labels.tolist() == [1, 2]


def test_cpu_passes_the_loader_through():
    batches = _batches()
    got = list(DevicePrefetcher(batches, torch.device("cpu"), channels_last=False))
    assert len(got) == 3 and all(g[0] is b[0] and g[1] is b[1] for g, b in zip(got, batches))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_equal_the_direct_copy():
    dev = torch.device("cuda")
    batches = [(img.pin_memory(), lab.pin_memory()) for img, lab in _batches(5)]
    got = list(DevicePrefetcher(batches, dev, channels_last=True))
    assert len(got) == 5
    for (img, lab), (g_img, g_lab) in zip(batches, got):
        ref, ref_lab = to_training_layout(img, lab, dev, channels_last=True)
        assert g_img.is_cuda and g_img.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(g_img, ref, rtol=0, atol=0)
        assert torch.equal(g_lab, ref_lab)
