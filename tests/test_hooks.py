"""Feature-capture hook: layer resolution, DDP, removal, state_dict/ONNX unchanged."""

import io
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from otface.hooks import FeatureCapture, resolve_feature_layer
from otface.registry import HOOKS


class TinyNet(nn.Module):
    def __init__(self, checkpointed=False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 6)
        self.checkpointed = checkpointed

    def _body(self, x):
        return self.bn2(self.conv2(torch.relu(self.conv1(x))))

    def forward(self, x):
        if self.checkpointed:
            f = checkpoint(self._body, x, use_reentrant=False)
        else:
            f = self._body(x)
        return self.fc(f.flatten(1))


class WithAttr(TinyNet):
    feature_layer = "conv2"


class NoBn2(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.norm(self.stem(x))


def test_auto_resolution_rules():
    assert resolve_feature_layer(TinyNet()) == "bn2"
    assert resolve_feature_layer(WithAttr()) == "conv2"
    with pytest.raises(ValueError, match="NoBn2.*stem, norm"):
        resolve_feature_layer(NoBn2())
    assert resolve_feature_layer(NoBn2(), "stem") == "stem"
    with pytest.raises(ValueError, match="'conv9'.*conv1, conv2, bn2"):
        resolve_feature_layer(TinyNet(), "conv9")


def test_capture_holds_latest_output_with_grad_and_removal():
    net = TinyNet()
    keys = list(net.state_dict())
    x = torch.randn(2, 3, 8, 8)
    with FeatureCapture(net, layer="conv1") as cap:
        net(x)
        assert cap.features.shape == (2, 4, 8, 8) and cap.features.requires_grad
        torch.testing.assert_close(cap.features, net.conv1(x))
        assert list(net.state_dict()) == keys
        assert len(net.conv1._forward_hooks) == 1
    assert cap.features is None
    assert all(len(m._forward_hooks) == 0 for m in net.modules())
    cap.remove()  # idempotent


def test_registry_builder_and_gradient_checkpointing():
    net = TinyNet(checkpointed=True)
    ref = TinyNet()
    ref.load_state_dict(net.state_dict())
    x = torch.randn(3, 3, 8, 8)
    grads = []
    for model in (net, ref):
        cap = HOOKS.build("hard_triplet", model)
        model(x)
        cap.pop().pow(2).sum().backward()
        grads.append(model.conv1.weight.grad.clone())
        cap.remove()
    torch.testing.assert_close(grads[0], grads[1])


def test_autocast_capture_is_differentiable():
    net = TinyNet()
    with FeatureCapture(net) as cap, torch.autocast("cpu", dtype=torch.bfloat16):
        net(torch.randn(2, 3, 8, 8))
        f = cap.features
    assert f.requires_grad
    f.float().sum().backward()
    assert net.conv2.weight.grad is not None


def test_ddp_wrapped(tmp_path):
    store = dist.FileStore(os.fspath(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        net = TinyNet()
        ddp = nn.parallel.DistributedDataParallel(net)
        keys = list(ddp.state_dict())
        assert resolve_feature_layer(ddp) == "bn2"
        cap = FeatureCapture(ddp, layer="conv2")
        ddp(torch.randn(2, 3, 8, 8))
        assert cap.features.shape == (2, 8, 4, 4)
        assert list(ddp.state_dict()) == keys
        cap.remove()
        assert len(net.conv2._forward_hooks) == 0
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_onnx_export_unchanged():
    pytest.importorskip("onnx")
    import onnx

    def export(model):
        buf = io.BytesIO()
        torch.onnx.export(
            model, (torch.randn(1, 3, 8, 8),), buf, dynamo=False, input_names=["data"]
        )
        return onnx.load_from_string(buf.getvalue())

    net = TinyNet().eval()
    plain = export(net)
    with FeatureCapture(net):
        hooked = export(net)
    assert len(hooked.graph.output) == len(plain.graph.output) == 1
    assert [n.op_type for n in hooked.graph.node] == [n.op_type for n in plain.graph.node]
    assert len(hooked.graph.initializer) == len(plain.graph.initializer)
