"""The settings of a run, explicit: small frozen dataclasses that the pipeline's functions take.

test.py (and run_pipeline.py) turn the parsed options into these once
(:func:`options.run_specs.run_spec`); no library function reads the command line's options.
Defaults are test.py's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ModelSpec:
    """What :func:`pipeline.model.build_model` builds: the network, the face model, the renderer.

    Attributes:
        checkpoint: path of the network's checkpoint file (``checkpoints/<name>/epoch_<E>.pth``).
        net_recon: the backbone, ``resnet18`` | ``resnet34`` | ``resnet50``.
        use_last_fc: all coefficients from the backbone's last fully connected layer.
        bfm_folder, bfm_model: the face model's folder and its converted file's name there.
        focal, center: the camera in crop pixels (the crop's side is ``2 * center``).
        camera_d: camera distance (dm); z_near, z_far: the clipping planes.
        use_opengl: nvdiffrast's OpenGL context (EGL) instead of its CUDA rasterizer.
        amp: the network's precision, ``none`` | ``bf16`` | ``fp16``.
        tf32: let cuDNN run float32 convolutions in TF32 (else full float32).
        channels_last, compile: the network's memory format and ``torch.compile``.
    """

    checkpoint: str
    net_recon: str = "resnet50"
    use_last_fc: bool = False
    bfm_folder: str = "BFM"
    bfm_model: str = "BFM_model_front.mat"
    focal: float = 1015.0
    center: float = 112.0
    camera_d: float = 10.0
    z_near: float = 5.0
    z_far: float = 15.0
    use_opengl: bool = False
    amp: str = "none"
    tf32: bool = False
    channels_last: bool = False
    compile: bool = False


@dataclass(frozen=True)
class LoaderSpec:
    """How photos become batches of aligned crops (:func:`pipeline.loader.face_loader`).

    Attributes:
        batch_size: faces per batch; <= 0: the device's default (:func:`pipeline.workers.default_batch_size`).
        num_threads: DataLoader worker processes; -1: auto (:func:`pipeline.workers.loader_workers`).
        resample_on_device: make the crops on the run's device (the workers only decode and align).
        decode_on_device: also decode JPEGs there (nvJPEG through torchvision).
        prefetch_batches: batches a thread readies ahead; -1: auto (:func:`pipeline.workers.prefetch_depth`).
    """

    batch_size: int = -1
    num_threads: int = -1
    resample_on_device: bool = False
    decode_on_device: bool = False
    prefetch_batches: int = -1

    def batch_size_on(self, device: "torch.device") -> int:
        """The batch size on ``device``: :attr:`batch_size`, or the device's default."""
        from pipeline.workers import default_batch_size

        return self.batch_size if self.batch_size > 0 else default_batch_size(device)


@dataclass(frozen=True)
class OutputSpec:
    """Which files each face gets (the output registry, :mod:`pipeline.outputs`, reads these).

    Attributes:
        save_png, save_mesh, save_mat: the result picture, the mesh, the coefficients' .mat.
        mesh_format: ``obj`` | ``ply`` | ``glb``.
        uv_texture: a UV texture (``<name>_texture.png``) and UVs in the mesh; uv_texture_size: its side.
        report: the HTML report's per-face files (and index.html, written by the CLI).
        extra: names of further registered outputs (:func:`pipeline.outputs.register`) to write.
    """

    save_png: bool = True
    save_mesh: bool = True
    save_mat: bool = True
    mesh_format: str = "obj"
    uv_texture: bool = False
    uv_texture_size: int = 512
    report: bool = False
    extra: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunSpec:
    """One run of test.py over a folder.

    Attributes:
        img_folder: the folder of photos (detections in ``<img_folder>/detections/``).
        out_dir: the results folder.
        model, loader, outputs: the specs above.
        recursive: photos in sub-folders too.
        skip_existing: leave out faces whose requested files are all there.
        fit_steps: per-face fitting steps after the network (0: none).
        fit_loss: what that fitting minimises (:func:`models.fitting.fit_config`: ``front`` or ``train``).
        write_workers: writer processes; -1: auto (:func:`pipeline.workers.writer_workers`).
        device, gpu_ids, ddp_port: the device choice (:func:`pipeline.runtime.resolve_device`) and the
            rendezvous port of spawned ranks.
        verbose: progress bars on every rank.
    """

    img_folder: str
    out_dir: str
    model: ModelSpec
    loader: LoaderSpec = field(default_factory=LoaderSpec)
    outputs: OutputSpec = field(default_factory=OutputSpec)
    recursive: bool = False
    skip_existing: bool = False
    fit_steps: int = 0
    fit_loss: str = "front"
    write_workers: int = -1
    device: str = "auto"
    gpu_ids: str = "0"
    ddp_port: str = "12355"
    verbose: bool = False
