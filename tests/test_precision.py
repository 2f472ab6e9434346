"""util.precision.ieee_fp32 and where test.py uses it."""
import pytest
import torch

from util.precision import ieee_fp32


def _settings():
    conv, matmul = getattr(torch.backends.cudnn, "conv", None), torch.backends.cuda.matmul
    if hasattr(conv, "fp32_precision"):
        return conv.fp32_precision, matmul.fp32_precision
    return torch.backends.cudnn.allow_tf32, matmul.allow_tf32


def test_ieee_fp32_sets_full_precision_on_cuda_and_restores_it():
    before = _settings()
    with ieee_fp32(torch.device("cuda")):  # the flags exist without a GPU
        inside = _settings()
    assert _settings() == before
    assert inside in (("ieee", "ieee"), (False, False))


def test_ieee_fp32_leaves_other_devices_alone():
    before = _settings()
    with ieee_fp32(torch.device("cpu")):
        assert _settings() == before


def test_test_py_runs_the_network_in_full_float32_unless_asked_for_tf32(standin):
    from options.run_specs import model_spec
    from options.test_options import parse_test_options
    from pipeline.model import build_model

    base = [f"--name={standin['name']}", "--epoch=20", f"--bfm_folder={standin['bfm_folder']}",
            f"--checkpoints_dir={standin['checkpoints_dir']}"]
    assert build_model(model_spec(parse_test_options(base)), torch.device("cpu")).ieee_fp32 is True
    assert build_model(model_spec(parse_test_options(base + ["--tf32"])), torch.device("cpu")).ieee_fp32 is False


@pytest.mark.gpu
def test_cuda_predict_coeffs_runs_the_network_inside_ieee_fp32():
    from models.facerecon import FaceReconModel

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(_settings())
            return torch.zeros(x.shape[0], 257, device=x.device)

    x = torch.zeros(1, 3, 8, 8, device="cuda")
    before = _settings()
    FaceReconModel(Probe(), None, None, ieee_fp32=True).predict_coeffs(x)
    FaceReconModel(Probe(), None, None, ieee_fp32=False).predict_coeffs(x)
    assert seen[0] in (("ieee", "ieee"), (False, False)) and seen[1] == before and _settings() == before
