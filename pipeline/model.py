"""The model of a run: the face model, network and renderer built from the settings, and the
device's warm-up (CUDA context, cuDNN/cuBLAS, the nvdiffrast plugin, nvJPEG) in threads."""
from __future__ import annotations

import threading

import torch

from pipeline.runtime import SetupError, renderer_backend
from pipeline.settings import ModelSpec
from util.assets import MissingAssetError


def _warm_up_device(device: torch.device, backend: str) -> None:
    """CUDA context, cuDNN and cuBLAS, and the nvdiffrast plugin, ahead of the first batch (run in
    a thread while the model files load). Errors are left for the real calls to report."""
    try:
        x = torch.zeros(1, 3, 8, 8, device=device)
        torch.nn.functional.conv2d(x, torch.zeros(4, 3, 3, 3, device=device))  # loads cuDNN
        x.flatten(1) @ torch.zeros(192, 4, device=device)  # and cuBLAS
        if backend != "cpu":
            from models.renderer import nvdiffrast_backend

            nvdiffrast_backend.warm_up(backend)
    except Exception:  # noqa: BLE001
        pass


def _warm_up_decoder(device: torch.device) -> None:
    try:
        from data.image_folder import warm_up_decoder

        warm_up_decoder(device)
    except Exception:  # noqa: BLE001 - the first real decode reports it
        pass


def _thread(target, name: str, *args) -> threading.Thread:
    t = threading.Thread(target=target, name=name, args=args, daemon=True)
    t.start()
    return t


def start_warm_up(device: torch.device, use_opengl: bool = False) -> threading.Thread | None:
    """Start readying a CUDA device and the nvdiffrast plugin in a thread, while the model loads.

    Args:
        device: the run's device; nothing is started off CUDA.
        use_opengl: ready nvdiffrast's OpenGL context instead of its CUDA rasterizer.

    Returns:
        the started daemon thread, or None off CUDA. Its errors are left for the real calls.
    """
    if device.type != "cuda":
        return None
    return _thread(_warm_up_device, "warm-up", device, renderer_backend(device, use_opengl))


def start_decoder_warm_up(device: torch.device, decode_on_device: bool) -> threading.Thread | None:
    """Ready nvJPEG (:func:`data.image_folder.warm_up_decoder`) in a thread of its own.

    Args:
        device: the run's device. decode_on_device: whether the run decodes JPEGs there.

    Returns:
        the started daemon thread where both hold (CUDA, decoding on it), else None.
    """
    if device.type != "cuda" or not decode_on_device:
        return None
    return _thread(_warm_up_decoder, "warm-up-decoder", device)


def warm_up_network(model, batch_size: int, device: torch.device) -> None:
    """On CUDA, one forward pass of ``model``'s network on (batch_size, 3, 224, 224) zeros, so that
    cuDNN picks and loads its kernels before the first batch of photos (give that batch's size: a
    run of fewer faces than a batch, e.g. one photo, then loads only the kernels it uses);
    nothing elsewhere."""
    if device.type != "cuda":
        return
    with torch.inference_mode():
        model.predict_coeffs(torch.zeros(batch_size, 3, 224, 224, device=device))


def build_model(spec: ModelSpec, device: torch.device, warm: threading.Thread | None = None):
    """The :class:`models.facerecon.FaceReconModel` of ``spec`` on ``device``, in eval mode.

    Args:
        spec: the network, face model and renderer settings.
        device: where the model lives; the renderer's backend follows it (:func:`renderer_backend`).
        warm: a warm-up thread from :func:`start_warm_up`; None: one is started here (on CUDA).
            It readies the device while the files load, and is joined before the renderer is made.

    Returns:
        the model (network possibly channels_last and/or ``torch.compile``d).

    Raises:
        SetupError: a missing or broken face model or checkpoint (one line).
    """
    from models.bfm import ParametricFaceModel
    from models.facerecon import FaceReconModel
    from models.networks import CheckpointError, load_recon_net
    from models.renderer import create_renderer

    backend = renderer_backend(device, spec.use_opengl)
    if warm is None:
        warm = start_warm_up(device, spec.use_opengl)
    try:
        face_model = ParametricFaceModel.from_folder(spec.bfm_folder, spec.bfm_model, camera_distance=spec.camera_d,
                                                     focal=spec.focal, center=spec.center)
        net = load_recon_net(spec.checkpoint, spec.net_recon, spec.use_last_fc)
    except (MissingAssetError, CheckpointError, ValueError) as e:
        raise SetupError(str(e)) from None
    finally:
        if warm is not None:
            warm.join()
    renderer = create_renderer(backend, focal=spec.focal, center=spec.center,
                               z_near=spec.z_near, z_far=spec.z_far, device=device)
    model = FaceReconModel(net, face_model, renderer, amp=spec.amp, channels_last=spec.channels_last,
                           ieee_fp32=not spec.tf32)
    model = model.to(device).eval()
    if spec.channels_last:
        model.net.to(memory_format=torch.channels_last)
    if spec.compile:
        model.net = torch.compile(model.net)
    return model
