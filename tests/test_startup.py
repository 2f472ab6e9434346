"""Start-up of test.py (issue #5): what is imported when, building the network for a checkpoint
without initialising it, the face model cache's layout, and the timing that test.py logs."""
from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys

import numpy as np
import torch

from tests.conftest import ROOT, make_photo_folder


def _python(code: str) -> str:
    """Run ``code`` in a fresh interpreter from the repository root; return its stdout."""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_nothing_heavy_is_imported_before_it_is_used():
    """Options parse without torch; the inference stack imports neither scipy nor nvdiffrast
    nor torch._dynamo (each is imported where used: .mat files, the CUDA renderer, compile)."""
    loaded = _python(
        "import sys, test, options.test_options\n"
        "print('torch' in sys.modules)\n"
        "import pipeline.run, pipeline.ranks, models.networks, models.bfm, models.renderer, models.facerecon\n"
        "import data.image_folder, util.image_io, util.results_io\n"
        "print(sorted(m for m in ('scipy', 'nvdiffrast', 'torch._dynamo') if m in sys.modules))\n")
    assert loaded.splitlines() == ["False", "[]"]


def _checkpoint(path, net: torch.nn.Module, dtype: torch.dtype = torch.float32) -> None:
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    torch.save({"net_recon": state, "epoch": 20}, path)


def test_load_recon_net_does_not_initialise(tmp_path, monkeypatch):
    """load_recon_net builds on the meta device: no random initialisation (~0.3 s for a
    ResNet-50 on a CPU), every tensor from the checkpoint, the same numbers as a copy into a
    freshly initialised network."""
    from models.networks import ReconNet, load_recon_net

    torch.manual_seed(0)
    ref = ReconNet("resnet18")
    for head in ref.final_layers:
        torch.nn.init.normal_(head.weight, std=0.01)
    ref.eval()
    _checkpoint(tmp_path / "epoch_20.pth", ref)

    def no_init(*args, **kwargs):
        raise AssertionError("weights initialised although the checkpoint sets them")

    monkeypatch.setattr(torch.nn.init, "kaiming_normal_", no_init)  # ResNet's own initialisation
    net = load_recon_net(str(tmp_path / "epoch_20.pth"), "resnet18")
    monkeypatch.undo()

    tensors = dict(net.named_parameters()) | dict(net.named_buffers())
    assert not any(t.is_meta for t in tensors.values())
    assert all(p.dtype == torch.float32 and p.requires_grad for p in net.parameters())
    assert not net.training
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=0, atol=0)


def test_initialisation_unchanged_off_the_meta_device():
    """Training still starts from the original's initialisation (BatchNorm 1/0, zero heads)."""
    from models.networks import ReconNet

    net = ReconNet("resnet18")
    assert torch.equal(net.backbone.bn1.weight, torch.ones(64)) and torch.equal(net.backbone.bn1.bias, torch.zeros(64))
    assert all(not h.weight.any() and not h.bias.any() for h in net.final_layers)
    assert net.backbone.conv1.weight.std() > 0
    with torch.device("meta"):
        meta = ReconNet("resnet18")
    assert meta.backbone.conv1.weight.is_meta


def test_half_precision_checkpoint_loads_as_float32(tmp_path):
    from models.networks import ReconNet, load_recon_net

    ref = ReconNet("resnet18").eval()
    _checkpoint(tmp_path / "epoch_20.pth", ref, torch.float16)
    net = load_recon_net(str(tmp_path / "epoch_20.pth"), "resnet18")
    assert all(t.dtype == torch.float32 for t in net.state_dict().values() if t.is_floating_point())
    for k, v in ref.state_dict().items():
        assert torch.equal(net.state_dict()[k], v.half().float() if v.is_floating_point() else v), k


def test_load_recon_net_does_not_import_dynamo(standin):
    """Initialising meta tensors would import torch._dynamo (~1.5 s); loading must not."""
    out = _python("import sys\nfrom models.networks import load_recon_net\n"
                  f"load_recon_net({standin['checkpoint']!r})\nprint('torch._dynamo' in sys.modules)")
    assert out == "False"


def test_face_model_cache_is_c_ordered_and_readable_like_its_mat(tmp_path, tiny_model_dict):
    from scipy.io import savemat

    from models.bfm import load_front_model
    from util.mat_cache import cache_path

    path = str(tmp_path / "BFM_model_front.mat")
    savemat(path, {k: np.asfortranarray(v) for k, v in tiny_model_dict.items()})
    os.chmod(path, 0o644)
    load_front_model(str(tmp_path))  # writes the cache
    assert stat.S_IMODE(os.stat(cache_path(path)).st_mode) == 0o644
    cached = load_front_model(str(tmp_path))
    for k, v in tiny_model_dict.items():
        assert cached[k].flags.c_contiguous and np.array_equal(cached[k], v), k


def test_face_model_cache_of_an_older_format_is_rebuilt(tmp_path, tiny_model_dict):
    """A cache written before CACHE_FORMAT 2 (Fortran-ordered arrays, a 2-number stamp) is rebuilt."""
    from scipy.io import savemat

    from models import bfm
    from util import mat_cache

    path = str(tmp_path / "BFM_model_front.mat")
    savemat(path, tiny_model_dict)
    old = mat_cache.source_stamp(path)[:2]
    np.savez(mat_cache.cache_path(path), __source__=old, **{k: np.asfortranarray(v) for k, v in tiny_model_dict.items()})
    assert mat_cache.read_cache(path) is None
    bfm.load_front_model(str(tmp_path))
    assert mat_cache.read_cache(path) is not None and mat_cache.read_cache(path)["idBase"].flags.c_contiguous


def test_standard_landmarks_load_from_their_cache_without_scipy(tmp_path):
    """load_lm3d caches similarity_Lm3D_all.mat beside it; a fresh process then reads the same
    (5, 3) points without importing scipy (its import was on test.py's start-up path)."""
    import shutil

    from util.mat_cache import cache_path
    from util.preprocess import load_lm3d

    mat = shutil.copy(os.path.join(ROOT, "BFM", "similarity_Lm3D_all.mat"), tmp_path)
    first = load_lm3d(str(tmp_path))  # from the .mat (scipy), writes the cache
    assert os.path.isfile(cache_path(mat))
    out = _python("import sys\nfrom util.preprocess import load_lm3d\n"
                  f"print(load_lm3d({str(tmp_path)!r}).tobytes().hex())\nprint('scipy' in sys.modules)")
    again, scipy_loaded = out.splitlines()
    assert bytes.fromhex(again) == first.tobytes() and first.shape == (5, 3) and first.dtype == np.float32
    assert scipy_loaded == "False"


def test_test_py_logs_its_start_up(tmp_path, standin, caplog):
    import test as test_cli

    folder = make_photo_folder(str(tmp_path / "one"), ["000002.jpg"])
    argv = ["--name=standin", "--epoch=20", f"--img_folder={folder}", f"--bfm_folder={standin['bfm_folder']}",
            f"--checkpoints_dir={standin['checkpoints_dir']}", f"--results_dir={tmp_path / 'out'}", "--verbose"]
    with caplog.at_level(logging.INFO, logger="test"):
        assert test_cli.main(argv) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "test"]
    assert len(lines) == 2 and lines[0].startswith("start-up: imports and options ")
    assert "first results after " in lines[0] and "1 face(s) after " in lines[0]
    assert os.path.isfile(tmp_path / "out" / "000002.png")
    # the run's phases, in the order they end, each at a time not before the one before it
    assert lines[1].startswith("run timeline: ")
    phases = [p.rsplit(" ", 2) for p in lines[1][len("run timeline: "):].split(", ")]
    assert all(p[2] == "s" for p in phases)
    seconds = {p[0]: float(p[1]) for p in phases}
    main_thread = ["scanned", "model_ready", "writers_started", "first_batch", "first_result", "last_batch", "written"]
    assert sorted(seconds) == sorted(main_thread + ["first_crops"])  # first_crops: the prefetch thread's
    assert [seconds[k] for k in main_thread] == sorted(seconds[k] for k in main_thread) and seconds["scanned"] >= 0
    assert seconds["scanned"] <= seconds["first_crops"] <= seconds["first_batch"]


def test_a_one_photo_run_imports_no_scipy(tmp_path, standin):
    """test.py on one photo (no worker processes: everything in its own process) reads the
    standard landmarks from their cache, crops without scipy's sparse matrices and writes the
    .mat with util.mat5: scipy, whose import cost 0.2-0.5 s of start-up, is never imported."""
    folder = make_photo_folder(str(tmp_path / "one"), ["000002.jpg"])
    argv = ["--name=standin", "--epoch=20", f"--img_folder={folder}", f"--bfm_folder={standin['bfm_folder']}",
            f"--checkpoints_dir={standin['checkpoints_dir']}", f"--results_dir={tmp_path / 'out'}", "--device=cpu"]
    from util.preprocess import load_lm3d

    load_lm3d(standin["bfm_folder"])  # the landmarks' cache exists after any first run
    out = _python(f"import sys, test\nassert test.main({argv!r}) == 0\n"
                  "print(sorted({m.split('.')[0] for m in sys.modules if m.startswith('scipy')}))")
    assert out.splitlines()[-1] == "[]"
    from scipy.io import loadmat

    m = loadmat(str(tmp_path / "out" / "000002.mat"))
    assert m["id"].shape == (1, 80) and m["lm68"].shape == (1, 68, 2) and m["id"].dtype == np.float32
