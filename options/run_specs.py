"""The parsed options of test.py turned, once, into the pipeline's frozen settings
(:mod:`pipeline.settings`); the library takes those, never the options themselves."""
from __future__ import annotations

import os

from pipeline.settings import LoaderSpec, ModelSpec, OutputSpec, RunSpec


def model_spec(o) -> ModelSpec:
    """The :class:`ModelSpec` of options ``o`` (test.py's, or any with the model and renderer fields;
    ``amp``, ``tf32``, ``channels_last`` and ``compile`` take their defaults where ``o`` has none)."""
    from util.assets import checkpoint_file

    d = ModelSpec(checkpoint="")
    return ModelSpec(checkpoint=checkpoint_file(o.checkpoints_dir, o.name, o.epoch), net_recon=o.net_recon,
                     use_last_fc=o.use_last_fc, bfm_folder=o.bfm_folder, bfm_model=o.bfm_model, focal=o.focal,
                     center=o.center, camera_d=o.camera_d, z_near=o.z_near, z_far=o.z_far, use_opengl=o.use_opengl,
                     amp=getattr(o, "amp", d.amp), tf32=getattr(o, "tf32", d.tf32),
                     channels_last=getattr(o, "channels_last", d.channels_last),
                     compile=getattr(o, "compile", d.compile))


def loader_spec(o) -> LoaderSpec:
    return LoaderSpec(batch_size=o.batch_size, num_threads=o.num_threads, resample_on_device=o.resample_on_device,
                      decode_on_device=o.decode_on_device, prefetch_batches=o.prefetch_batches)


def output_spec(o) -> OutputSpec:
    return OutputSpec(save_png=o.save_png, save_mesh=o.save_mesh, save_mat=o.save_mat, mesh_format=o.mesh_format,
                      uv_texture=o.uv_texture, uv_texture_size=o.uv_texture_size, report=o.report)


def results_dir(o, folder: str | None = None) -> str:
    """``--results_dir``, else ``<checkpoints_dir>/<name>/results/<folder's name>/epoch_<E>_000000``
    (``folder``: default ``--img_folder``; test.py's ``--video`` gives the video's)."""
    if o.results_dir:
        return o.results_dir
    name = os.path.basename(os.path.normpath(o.img_folder if folder is None else folder))
    return os.path.join(o.checkpoints_dir, o.name, "results", name, f"epoch_{o.epoch}_000000")


def run_spec(o) -> RunSpec:
    """The :class:`RunSpec` of test.py's parsed options ``o``."""
    return RunSpec(img_folder=o.img_folder, out_dir=results_dir(o), model=model_spec(o), loader=loader_spec(o),
                   outputs=output_spec(o), recursive=o.recursive, skip_existing=o.skip_existing,
                   fit_steps=o.fit_steps, fit_loss=o.fit_loss, write_workers=o.write_workers, device=o.device,
                   gpu_ids=o.gpu_ids, ddp_port=o.ddp_port, verbose=o.verbose)
