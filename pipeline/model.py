"""The model of a run: the face model, network and renderer built from the settings, and the
device's warm-up (CUDA context, cuDNN/cuBLAS, the nvdiffrast plugin, nvJPEG) in threads."""
from __future__ import annotations

import torch

from pipeline.runtime import SetupError, renderer_backend
from util.assets import MissingAssetError, checkpoint_file


def checkpoint_path(opt) -> str:
    return checkpoint_file(opt.checkpoints_dir, opt.name, opt.epoch)


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


def _thread(target, name: str, *args):
    import threading

    t = threading.Thread(target=target, name=name, args=args, daemon=True)
    t.start()
    return t


def start_warm_up(opt, device: torch.device):
    """On CUDA, start readying the device and the nvdiffrast plugin in a thread (CUDA context
    creation and the plugin load take most of a GPU run's start-up); returns the thread or None."""
    if device.type != "cuda":
        return None
    return _thread(_warm_up_device, "warm-up", device, renderer_backend(device, opt.use_opengl))


def start_decoder_warm_up(opt, device: torch.device):
    """With ``--decode_on_device`` on CUDA, ready nvJPEG in a thread of its own (its first call
    costs ~0.9 s, as much as the rest of the warm-up; beside it the network runs its first batch);
    returns the thread or None."""
    if device.type != "cuda" or not getattr(opt, "decode_on_device", False):
        return None
    return _thread(_warm_up_decoder, "warm-up-decoder", device)


def warm_up_network(model, batch_size: int, device: torch.device) -> None:
    """One forward pass on zeros at the run's batch size: cuDNN picks its kernels for every layer
    now, beside the decoder's warm-up, not when the first batch of photos is waiting."""
    if device.type != "cuda":
        return
    with torch.inference_mode():
        model.predict_coeffs(torch.zeros(batch_size, 3, 224, 224, device=device))


def build_model(opt, device: torch.device, warm=None):
    """Face model, network and renderer for ``opt``; raises SetupError with a one-line reason.

    On CUDA the device and the nvdiffrast plugin are readied in a thread meanwhile (``warm``:
    one already started by :func:`start_warm_up`, else this starts it)."""
    from models.bfm import ParametricFaceModel
    from models.facerecon import FaceReconModel
    from models.networks import CheckpointError, load_recon_net
    from models.renderer import create_renderer

    backend = renderer_backend(device, opt.use_opengl)
    if warm is None:
        warm = start_warm_up(opt, device)
    try:
        face_model = ParametricFaceModel.from_folder(opt.bfm_folder, opt.bfm_model, camera_distance=opt.camera_d,
                                                     focal=opt.focal, center=opt.center)
        net = load_recon_net(checkpoint_path(opt), opt.net_recon, opt.use_last_fc)
    except (MissingAssetError, CheckpointError, ValueError) as e:
        raise SetupError(str(e)) from None
    finally:
        if warm is not None:
            warm.join()
    renderer = create_renderer(backend, focal=opt.focal, center=opt.center,
                               z_near=opt.z_near, z_far=opt.z_far, device=device)
    model = FaceReconModel(net, face_model, renderer, amp=opt.amp, channels_last=opt.channels_last,
                           ieee_fp32=not getattr(opt, "tf32", False))
    model = model.to(device).eval()
    if opt.channels_last:
        model.net.to(memory_format=torch.channels_last)
    if opt.compile:
        model.net = torch.compile(model.net)
    return model
