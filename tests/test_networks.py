"""Regressor: original parameter names, checkpoint round trip, clear errors for bad files."""
from __future__ import annotations

import pathlib

import pytest
import torch

from models.coeffs import COEFFS
from models.networks import CheckpointError, ReconNet, load_recon_net


def test_coefficient_layout():
    assert COEFFS.total == 257 and COEFFS.sizes == (80, 64, 80, 3, 27, 3)
    assert COEFFS.head_sizes == (80, 64, 80, 3, 27, 2, 1)
    s = COEFFS.slices()
    assert (s["angle"].start, s["gamma"].start, s["trans"].start) == (224, 227, 254)
    c = torch.arange(2 * 257.0).reshape(2, 257)
    assert torch.equal(COEFFS.merge(COEFFS.split(c)), c)
    with pytest.raises(ValueError, match="257"):
        COEFFS.split(torch.zeros(2, 256))


def test_state_dict_names_are_the_originals():
    """The names a Deep3DFaceRecon_pytorch epoch_N.pth holds (torchvision ResNet-50 + heads)."""
    sd = ReconNet("resnet50").state_dict()
    expected = {"backbone.conv1.weight", "backbone.bn1.running_var", "backbone.bn1.num_batches_tracked",
                "backbone.layer1.0.downsample.0.weight", "backbone.layer1.0.downsample.1.bias",
                "backbone.layer4.2.conv3.weight", "backbone.layer3.5.bn2.weight"}
    assert expected <= set(sd)
    assert not any(k.startswith("backbone.fc") for k in sd)
    # 53 conv/bn pairs: 1 stem + 16 blocks * 3 + 4 downsample
    assert sum(k.endswith("conv1.weight") or k.endswith("conv2.weight") or k.endswith("conv3.weight") for k in sd) == 49
    assert [tuple(sd[f"final_layers.{i}.weight"].shape) for i in range(7)] == [
        (n, 2048, 1, 1) for n in (80, 64, 80, 3, 27, 2, 1)]
    assert len(sd) == 318 + 14  # torchvision's resnet50 has 320 entries, 2 of them the fc


def test_forward_shape_and_zero_heads():
    net = ReconNet("resnet18").eval()
    with torch.no_grad():
        out = net(torch.rand(2, 3, 224, 224))
    assert out.shape == (2, 257) and torch.count_nonzero(out) == 0  # heads start at zero, as in the original


def test_use_last_fc_variant():
    net = ReconNet("resnet18", use_last_fc=True).eval()
    assert "backbone.fc.weight" in net.state_dict() and not hasattr(net, "final_layers")
    with torch.no_grad():
        assert net(torch.rand(1, 3, 224, 224)).shape == (1, 257)


def _original_style_checkpoint(path, net):
    """What the original's save_networks writes: net state, optimizer state and the epoch."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    torch.save({"net_recon": net.state_dict(), "opt_00": opt.state_dict(), "epoch": 20}, path)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    net = ReconNet("resnet18")
    for head in net.final_layers:
        torch.nn.init.normal_(head.weight, std=0.01)
    net.eval()
    path = tmp_path / "epoch_20.pth"
    _original_style_checkpoint(path, net)
    loaded = load_recon_net(str(path), "resnet18")
    assert list(loaded.state_dict()) == list(net.state_dict())
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)


def test_ddp_prefixed_state_dict_loads(tmp_path):
    net = ReconNet("resnet18")
    torch.save({"net_recon": {"module." + k: v for k, v in net.state_dict().items()}}, tmp_path / "e.pth")
    load_recon_net(str(tmp_path / "e.pth"), "resnet18")


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_recon_net(str(tmp_path / "nope" / "epoch_20.pth"))
    assert "epoch_20.pth" in str(e.value) and "not found" in str(e.value) and "\n" not in str(e.value)


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "epoch_20.pth"
    _original_style_checkpoint(path, ReconNet("resnet18"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_recon_net(str(path), "resnet18")
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_wrong_architecture_and_format(tmp_path):
    path = tmp_path / "epoch_20.pth"
    _original_style_checkpoint(path, ReconNet("resnet18"))
    with pytest.raises(CheckpointError, match="does not fit --net_recon resnet50"):
        load_recon_net(str(path), "resnet50")
    torch.save({"model": {}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="'net_recon'"):
        load_recon_net(str(tmp_path / "other.pth"))


def test_pickled_code_is_refused(tmp_path):
    """weights_only=True: a checkpoint that pickles arbitrary objects is not executed."""
    torch.save({"net_recon": ReconNet("resnet18").state_dict(), "x": pathlib.PurePosixPath("x")},
               tmp_path / "e.pth")
    with pytest.raises(CheckpointError, match="refused checkpoint .*Nothing of it was executed"):
        load_recon_net(str(tmp_path / "e.pth"), "resnet18")
