"""Reconstruct every detected face of a folder: the library behind test.py.

Streaming and batched: a DataLoader decodes and aligns photos in worker processes (uint8 crops),
the network, face model and renderer run on whole batches, and writer processes
(:mod:`util.results_io`) format and write the .obj/.png/.mat files off the critical path. At most
a few batches are in flight at any point, so memory stays flat however many photos there are.
Worker counts default to the machine's cores (see :func:`loader_workers`, :func:`writer_workers`).
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from models.coeffs import COEFFS
from util.assets import MissingAssetError, checkpoint_file
from pipeline.runtime import SetupError, renderer_backend, resolve_device  # noqa: F401 (re-exported)
from util.filenames import printable

log = logging.getLogger(__name__)


def checkpoint_path(opt) -> str:
    return checkpoint_file(opt.checkpoints_dir, opt.name, opt.epoch)


def results_dir(opt) -> str:
    if opt.results_dir:
        return opt.results_dir
    folder = os.path.basename(os.path.normpath(opt.img_folder))
    return os.path.join(opt.checkpoints_dir, opt.name, "results", folder, f"epoch_{opt.epoch}_000000")


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


# --------------------------------------------------------------------------- outputs
SKIPPED_LIST, FAILED_LIST = "skipped_photos.txt", "failed_faces.txt"  # beside the results, when long


@dataclass
class RunSummary:
    """Counts of one run (or one rank of a multi-GPU run)."""

    faces_ok: int = 0
    faces_failed: int = 0
    photos_without_detection: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (photo or face, reason)
    faces_done_before: int = 0  # left out by --skip_existing: their outputs were all there
    out_dir: str = ""
    img_folder: str = ""
    created_dirs: list[str] = field(default_factory=list)  # folders the run made for its results
    seconds: float = 0.0
    first_result_at: float | None = None  # time.perf_counter() when the first face's files were written
    timeline: dict[str, float] = field(default_factory=dict)  # phase -> seconds from the run's start when it ended
    stopped: str = ""  # why the run stopped before the end (disk full, read-only results): one line

    def merge(self, other: "RunSummary") -> None:
        self.faces_ok += other.faces_ok
        self.faces_failed += other.faces_failed
        self.faces_done_before += other.faces_done_before
        self.photos_without_detection = sorted(self.photos_without_detection + other.photos_without_detection)
        self.failures += other.failures
        self.img_folder = self.img_folder or other.img_folder
        self.created_dirs = sorted(set(self.created_dirs + other.created_dirs))
        self.seconds = max(self.seconds, other.seconds)
        self.stopped = self.stopped or other.stopped
        done = [t for t in (self.first_result_at, other.first_result_at) if t is not None]
        self.first_result_at = min(done) if done else None
        for phase, t in other.timeline.items():  # the slowest rank's
            self.timeline[phase] = max(t, self.timeline.get(phase, t))

    @property
    def exit_code(self) -> int:
        """0: every face with a detection was reconstructed (now or, with --skip_existing, before);
        1: some failed, the run stopped (:attr:`stopped`) or nothing to do."""
        ok = self.faces_failed == 0 and not self.stopped and self.faces_ok + self.faces_done_before > 0
        return 0 if ok else 1

    def _lists(self) -> dict[str, list[str]]:
        """File name -> lines of the run's two lists: photos skipped, faces failed (with why), each
        entry one printable line (:func:`util.filenames.printable`: a name's undecodable bytes as
        ``\\xNN``, a newline in it as ``\\n``), which any terminal and UTF-8 file takes."""
        return {SKIPPED_LIST: [printable(p) for p in self.photos_without_detection],
                FAILED_LIST: [printable(f"{what}: {why}") for what, why in self.failures]}

    def write_long_lists(self, listed: int) -> None:
        """Write each list longer than ``listed`` to its file in the results folder (one line an
        entry), for :meth:`report` to point at, and remove an earlier run's file of a list that
        is short now."""
        for name, lines in self._lists().items():
            path = os.path.join(self.out_dir, name)
            if len(lines) > listed:
                from util.atomic_files import write_bytes_atomic

                os.makedirs(self.out_dir, exist_ok=True)
                write_bytes_atomic(path, "".join(f"{line}\n" for line in lines).encode("utf-8"))
            elif os.path.isfile(path):
                os.remove(path)

    def remove_empty_dirs(self) -> None:
        """Remove the folders this run created for its results that are still empty (a run that
        reconstructed nothing leaves no empty results folder behind)."""
        for d in sorted(self.created_dirs, key=len, reverse=True):
            try:
                os.rmdir(d)
            except OSError:  # not empty, or gone
                pass

    def _why_nothing(self) -> str:
        """Why a run reconstructed nothing, pointing at what to do next."""
        folder = self.img_folder or "the folder"
        if not self.photos_without_detection:
            return f"nothing was reconstructed: no photos found in {folder}"
        report_path, reasons = process_report_reasons(self.img_folder)
        if reasons:
            counts = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
            return (f"nothing was reconstructed: process_images.sh gave no photo a detection file ({counts}); "
                    f"the reason for each photo is in {report_path}")
        return f"nothing was reconstructed: no photo has a detection file; run ./process_images.sh {folder} first"

    def report(self, listed: int | None = None) -> str:
        """The run's summary for the terminal: counts, then the photos skipped and the faces that
        failed, at most ``listed`` of each (None: all) with the rest's count and the file that
        :meth:`write_long_lists` wrote."""
        lines = [f"done: {self.faces_ok} face(s) reconstructed, {self.faces_failed} failed, "
                 f"{len(self.photos_without_detection)} photo(s) skipped without a detection file "
                 f"({self.seconds:.1f} s); "
                 + (f"results in {printable(self.out_dir)}" if os.path.isdir(self.out_dir)
                    else "no results folder written")]
        if self.faces_done_before:
            lines.append(f"{self.faces_done_before} face(s) left out: their outputs were there already "
                         "(--skip_existing)")
        report_path, reasons = process_report_reasons(self.img_folder)
        skipped = (f"skipped (no detections/<stem>.txt; process_images.sh's reasons in {report_path}):" if reasons
                   else "skipped (no detections/<stem>.txt; run ./process_images.sh on the folder first):")
        titles = {SKIPPED_LIST: skipped, FAILED_LIST: "failed:"}
        for name, entries in self._lists().items():
            if entries:
                lines.append(titles[name])
                lines += [f"  {e}" for e in entries[:listed]]
                if listed is not None and len(entries) > listed:
                    lines.append(f"  ... and {len(entries) - listed} more: all {len(entries)} in "
                                 f"{printable(os.path.join(self.out_dir, name))}")
        if self.faces_ok == 0 and not self.failures and not self.faces_done_before:
            lines.append(self._why_nothing())
        return "\n".join(lines)


def process_report_reasons(img_folder: str) -> tuple[str, dict[str, int]]:
    """(``<img_folder>/process_report.json``, its count of photos skipped per reason); the counts
    are empty when there is no such report or it cannot be read."""
    path = os.path.join(img_folder, "process_report.json")
    try:
        with open(path, encoding="utf-8") as f:
            skipped = json.load(f)["summary"]["skipped"]
        return path, {str(k): int(v) for k, v in skipped.items() if int(v) > 0}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return path, {}


def make_dirs(path: str) -> list[str]:
    """``os.makedirs(path, exist_ok=True)``; returns the folders it created, outermost first."""
    created, p = [], os.path.abspath(path)
    while not os.path.isdir(p) and os.path.dirname(p) != p:
        created.append(p)
        p = os.path.dirname(p)
    os.makedirs(path, exist_ok=True)
    return created[::-1]


def check_results_dir(out_dir: str, recursive: bool = False) -> None:
    """Fail early (before the model loads), creating nothing: the results folder must be a
    folder that a file can be made in (proved with a temporary file), or one that can be created
    (its nearest existing parent a writable folder). Removes the temporary files that killed
    runs left in it (ours only, of dead processes: :func:`util.atomic_files.remove_stale_temp_files`).
    Raises SetupError, one line."""
    from util.atomic_files import remove_stale_temp_files, temp_path

    def refuse(why: str) -> SetupError:
        return SetupError(f"cannot write results into {out_dir}: {why}; give a writable --results_dir")

    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise SetupError(f"the results folder {out_dir} is a file, not a folder; give another --results_dir")
    if os.path.isdir(out_dir):
        try:
            probe = temp_path(os.path.join(out_dir, "probe"))
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.remove(probe)
        except OSError as e:
            raise refuse(e.strerror) from None
        remove_stale_temp_files(out_dir, recursive)
        return
    parent = os.path.dirname(os.path.abspath(out_dir))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise refuse(f"{parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise refuse(f"no folder can be created in {parent} (read-only filesystem or no permission)")


def make_results_dir(out_dir: str) -> list[str]:
    """Create the results folder (:func:`check_results_dir` said it can be); returns the folders
    it created (:func:`make_dirs`); SetupError, one line."""
    try:
        return make_dirs(out_dir)
    except OSError as e:
        raise SetupError(f"cannot write results into {out_dir}: {e.strerror}; give a writable --results_dir") from None


def stop_line(reason, summary: "RunSummary", n_faces: int) -> str:
    """The one line of a run that a :class:`util.results_io.RunStop` ended: why, what was done,
    what is left and about how much space it needs, how to finish."""
    from util.results_io import human_bytes

    left = max(0, n_faces - summary.faces_ok - summary.faces_failed)
    need = f" (about {human_bytes(left * reason.face_bytes)} more)" if reason.face_bytes and left else ""
    failed = f", {summary.faces_failed} failed" if summary.faces_failed else ""
    return (f"{reason}; {summary.faces_ok} face(s) written{failed}, {left} left{need}; once there is "
            "room (or the folder is writable), the same command with --skip_existing true finishes the job")


def output_config(opt, face_buf: np.ndarray, out_dir: str):
    """The :class:`util.results_io.OutputConfig` of a run (triangle lines formatted once here)."""
    from util.mesh_io import face_lines
    from util.results_io import OutputConfig

    return OutputConfig(out_dir=out_dir, save_png=opt.save_png, save_mesh=opt.save_mesh, save_mat=opt.save_mat,
                        coeff_slices=tuple((k, s.start, s.stop) for k, s in COEFFS.slices().items()),
                        face_lines=face_lines(face_buf) if opt.save_mesh else b"",
                        crop_size=int(2 * opt.center), camera_d=float(opt.camera_d),
                        extras=output_extras(opt, face_buf))


def output_extras(opt, face_buf: np.ndarray):
    """The run's :class:`util.output_extras.OutputExtras` (--mesh_format, --uv_texture, --report),
    or None for plain .obj/.png/.mat; raises SetupError when the UV layout file is missing."""
    from options.output_options import output_format_settings
    from util.output_extras import make_output_extras
    from util.uv_texture import load_uv_layout

    s = output_format_settings(opt)
    uv = None
    if s.uv_texture and not 16 <= s.uv_texture_size <= 8192:
        raise SetupError(f"--uv_texture_size {s.uv_texture_size}: give a side between 16 and 8192 pixels")
    if s.uv_texture:
        try:
            uv = load_uv_layout(opt.bfm_folder, int(face_buf.max()) + 1)
        except (FileNotFoundError, ValueError) as e:
            raise SetupError(str(e)) from None
    return make_output_extras(s.mesh_format, face_buf, opt.save_mesh, uv, s.uv_texture_size, s.report,
                              opt.focal, opt.center, (COEFFS.slices()["angle"].start, COEFFS.slices()["angle"].stop))


def colors_to_uint8(color: torch.Tensor) -> torch.Tensor:
    """:func:`util.mesh_io.colors_to_uint8` on the tensor's device (same bytes: one float32
    product, clamp, truncation), so a quarter of the bytes leave the GPU."""
    return torch.clamp(255.0 * color, 0, 255).to(torch.uint8)


_STEPS: dict[torch.device, torch.Tensor] = {}


def overlay_uint8(image: torch.Tensor, render: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The result picture's middle panel, batched, on the render's device: the same bytes as
    :func:`util.visualize.overlay_uint8` (the original's float composition and tensor2im).

    Args: image (B, 3, H, W) uint8 crops; render (B, 3, H, W) float in 0..1; mask (B, 1, H, W)
    in {0, 1}, all on one device. Returns (B, H, W, 3) uint8. The render's bytes are found as in
    :func:`util.visualize.unit_to_uint8`: ``trunc(255 * x)``, then corrected by comparisons with
    the exact steps, so no device arithmetic (fused, reciprocal-multiplied, ...) can round
    differently from numpy (a ``torch.bucketize`` on the 255 steps gives the same, 5x slower on a CPU).
    """
    steps = _STEPS.get(render.device)
    if steps is None:  # copied once per device: a copy from pageable memory would wait for the queue
        from util.visualize import uint8_steps

        steps = _STEPS[render.device] = torch.from_numpy(uint8_steps()).to(render.device)
    x = render.permute(0, 2, 3, 1).float()
    k = (x * 255.0).clamp_(0, 255).to(torch.int32).clamp_(0, 255)  # within one of the byte; NaN's clamped
    k += (x >= steps[k + 1]).to(torch.int32)
    k -= (x < steps[k]).to(torch.int32)
    return torch.where(mask.permute(0, 2, 3, 1) != 0, k.to(torch.uint8), image.permute(0, 2, 3, 1))


def to_host(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Copy tensors to host numpy arrays: on CUDA all copies are queued (into pinned memory)
    and waited for once."""
    tensors = {k: t.detach().contiguous() for k, t in tensors.items()}
    cuda = [t.device for t in tensors.values() if t.device.type == "cuda"]
    host = {k: t.to("cpu", non_blocking=bool(cuda)) for k, t in tensors.items()}
    if cuda:
        torch.cuda.current_stream(cuda[0]).synchronize()
    return {k: t.numpy() for k, t in host.items()}


def render_overlay(model, face, images_u8: torch.Tensor) -> torch.Tensor:
    """FaceReconModel.reconstruct's render of ``face`` over the (B, 3, H, W) uint8 crops (any
    device; moved to the render's), as the picture's (B, H, W, 3) uint8 middle panel."""
    out = model.renderer(face.vertex, model.face_model.face_buf, feat=face.color)
    return overlay_uint8(images_u8.to(out.image.device, non_blocking=True), out.image, out.mask)


def batch_results(model, coeffs: torch.Tensor, batch: dict, opt) -> list:
    """Face model (and renderer, for the picture) on a batch's coefficients -> one
    :class:`util.results_io.FaceResult` per face, holding only what the output switches need,
    as small as the files allow: colours and the picture's middle panel are made bytes on the
    device (the picture's float work happens there, batched), vertices stay float32."""
    from options.output_options import output_format_settings
    from util.results_io import FaceResult

    extra = output_format_settings(opt)  # --uv_texture and --report need the mesh, the render and the crop
    need_mesh = opt.save_mesh or extra.uv_texture or extra.report
    need_render = opt.save_png or extra.uv_texture or extra.report
    with torch.inference_mode():
        if not (need_mesh or need_render):  # coefficients and landmarks only
            arrays = {"coeffs": coeffs, "lm68": model.face_model.landmarks(coeffs)}
            face = None
        else:
            face = model.face_model(coeffs)
            arrays = {"coeffs": coeffs, "lm68": face.landmark}
        if need_mesh:
            arrays["vertex"], arrays["color"] = face.vertex, colors_to_uint8(face.color)
        if need_render:  # the render only when the picture (or a texture, the report) is written
            if extra.uv_texture or extra.report:
                from models.output_extras import extra_arrays

                out = model.renderer(face.vertex, model.face_model.face_buf, feat=face.color)
                arrays["overlay"] = overlay_uint8(batch["image"].to(out.image.device, non_blocking=True), out.image,
                                                  out.mask)
                arrays.update(extra_arrays(model, face, out, batch["image"], extra.uv_texture, extra.report))
            else:
                arrays["overlay"] = render_overlay(model, face, batch["image"])
            if batch["image"].device.type != "cpu":  # the picture's left panel, made on the device
                arrays["crop"] = batch["image"]
    host = to_host({k: v.float() if v.is_floating_point() else v for k, v in arrays.items()})
    image, lm_gt = host.get("crop"), batch["lm"].numpy()
    if image is None and need_render:
        image = batch["image"].numpy()
    results = []
    for i, m in enumerate(batch["meta"]):
        r = FaceResult(name=m["name"], rel_dir=m["rel_dir"], coeffs=host["coeffs"][i], lm68=host["lm68"][i])
        if need_mesh:
            r.vertex, r.color = host["vertex"][i], host["color"][i]
        if need_render:
            r.image, r.overlay, r.lm_gt = image[i], host["overlay"][i], lm_gt[i]
        for k in ("visibility", "albedo", "photo_error"):
            if k in host:
                setattr(r, k, host[k][i])
        results.append(r)
    return results


def output_suffixes(opt) -> list[str]:
    """The files test.py writes per face, as the save_* switches ask."""
    from options.output_options import output_format_settings
    from util.output_extras import extra_suffixes

    extra = output_format_settings(opt)
    return ([".png"] if opt.save_png else []) + extra_suffixes(extra.mesh_format, opt.save_mesh, extra.uv_texture) \
        + ([".mat"] if opt.save_mat else [])


def without_finished(entries: list, out_dir: str, suffixes: list[str]) -> tuple[list, int]:
    """``--skip_existing``: (the entries not all of whose ``suffixes`` files are in ``out_dir``
    (under their ``rel_dir``), how many were left out). One listing per results sub-folder; a
    file being written has a temporary name, so a name present is a complete file."""
    if not suffixes:
        return entries, 0
    listed: dict[str, set[str]] = {}
    todo = []
    for e in entries:
        names = listed.get(e.rel_dir)
        if names is None:
            try:
                names = listed[e.rel_dir] = set(os.listdir(os.path.join(out_dir, e.rel_dir)))
            except (FileNotFoundError, NotADirectoryError):
                names = listed[e.rel_dir] = set()
        if not all(e.name + suffix in names for suffix in suffixes):
            todo.append(e)
    return todo, len(entries) - len(todo)


# --------------------------------------------------------------------------- workers
SMALL_RUN_FACES = 32  # below this, writer processes cost more to start than they save


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask; os.cpu_count() where unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def ranks_per_host(world: int) -> int:
    """Processes of this run sharing the machine: torchrun's LOCAL_WORLD_SIZE, else ``world``."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def loader_workers(requested: int, n_faces: int, batch_size: int, world: int = 1) -> int:
    """DataLoader workers: ``requested``, or with -1 (auto) the cores per rank minus one (the
    main process), at most 16; none when everything fits one batch (no process to start)."""
    if n_faces <= batch_size:
        return 0
    if requested < 0:
        requested = min(16, max(1, usable_cores() // ranks_per_host(world) - 1))
    return min(requested, -(-n_faces // batch_size))


def writer_workers(requested: int, n_faces: int, world: int = 1) -> int:
    """Writer processes: ``requested`` (0 = write in the main process), or with -1 (auto) one per
    core per rank, at most 16, and none for small runs (<= 32 faces). Never more than faces."""
    if requested < 0:
        if n_faces <= SMALL_RUN_FACES:
            return 0
        requested = min(16, max(1, usable_cores() // ranks_per_host(world)))
    return min(requested, n_faces)


# --------------------------------------------------------------------------- the run
def default_batch_size(device: torch.device) -> int:
    """``--batch_size -1``: 64 on CUDA (what the benchmarks measured: the GPU is then far from
    the bottleneck, 1.1 GiB at peak), 8 on the CPU (the CPU rasterizer gains nothing from more)."""
    return 64 if device.type == "cuda" else 8


def prefetch_depth(requested: int, device: torch.device) -> int:
    """``--prefetch_batches -1``: 2 on CUDA; 0 on the CPU, where a crops thread would share the
    cores with the network (with it, a CPU test of byte-equal files failed once in two runs on a
    32-core host: the convolutions' rounding may depend on the threads they get)."""
    if requested >= 0:
        return requested
    return 2 if device.type == "cuda" else 0


def face_loader(opt, entries: list, device: torch.device, world: int = 1, batch_size: int | None = None):
    """The DataLoader of :func:`run_folder` over ``entries`` (this rank's share): aligned uint8
    crops in batches of ``batch_size`` (default: ``--batch_size``, or the device's default), decoded
    in :func:`loader_workers` worker processes, pinned for a CUDA ``device``. Workers start on the
    first ``iter()``."""
    from torch.utils.data import DataLoader

    from data.image_folder import AlignedFaces, collate_faces
    from util.preprocess import load_lm3d

    bs = batch_size or (default_batch_size(device) if opt.batch_size <= 0 else opt.batch_size)
    try:
        lm3d = load_lm3d(opt.bfm_folder)
    except (MissingAssetError, ValueError) as e:  # missing or damaged
        raise SetupError(str(e)) from None
    if opt.decode_on_device:
        from data.image_folder import torchvision_jpeg_decoder

        try:
            torchvision_jpeg_decoder()
        except ImportError as e:
            raise SetupError(str(e)) from None
    dataset = AlignedFaces(entries, lm3d, resample_on_device=opt.resample_on_device,
                           decode_on_device=opt.decode_on_device)
    workers = loader_workers(opt.num_threads, len(entries), bs, world)
    return DataLoader(dataset, batch_size=bs, shuffle=False, num_workers=workers, collate_fn=collate_faces,
                      pin_memory=device.type == "cuda", worker_init_fn=loader_worker_init if workers else None)


def loader_worker_init(worker_id: int) -> None:
    """A DataLoader worker keeps its freed memory: each face's alignment makes arrays of the
    same sizes (:func:`util.subprocesses.keep_freed_memory`), and ends with the run's process,
    even one killed with ``kill -9`` (torch's own check takes up to 5 s): SIGTERM when the
    parent dies, taken as an exit, so that multiprocessing's exit removes the worker's
    ``pymp-*`` folder (the socket it hands tensors over by)."""
    import signal

    from util.subprocesses import die_with_parent, keep_freed_memory

    keep_freed_memory()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    die_with_parent(signal.SIGTERM)


def _exit_on_sigterm(signum, frame) -> None:
    """Exit through Python's exit (multiprocessing's clean-up runs), or at once after 2 s if
    that clean-up hangs (a queue whose reader is gone)."""
    import sys
    import threading

    timer = threading.Timer(2.0, os._exit, args=(1,))
    timer.daemon = True
    timer.start()
    sys.exit(1)


def run_folder(opt, device: torch.device, rank: int = 0, world: int = 1, progress: bool = True,
               model=None, only=None, on_batch=None) -> RunSummary:
    """Reconstruct every detected face of ``opt.img_folder`` on ``device`` (this rank's share).

    The DataLoader's workers start first (they decode and align while the model loads), then
    the model and the writers (their forkserver imports its modules meanwhile). On CUDA the
    network's first pass runs on zeros while a thread readies the JPEG decoder, and a thread
    (:class:`util.prefetch.Prefetcher`) takes the batches from the DataLoader and readies their
    crops on the device (:func:`data.image_folder.batch_crops`), :func:`prefetch_depth` batches
    ahead; the main thread runs the network on them and hands numpy arrays to the writers.
    ``RunSummary.timeline`` records when each phase ended. ``only``: a set of photos (paths
    relative to the folder, '/'-separated, as process_images' report names them) to reconstruct,
    the others left out and not reported (run_pipeline's rounds).
    ``on_batch(model, images, coeffs, batch)``,
    when given, sees each batch's (B, 3, 224, 224) float crops and final (B, 257) coefficients
    (after fitting) with the collated batch (its 'meta', 'lm', ...), e.g. to collect them
    (:mod:`pipeline.image_sets`).
    """
    from data.image_folder import batch_crops, images_to_float, scan_folder
    from util.prefetch import prefetched
    from util.results_io import ResultWriter, RunStop, launch_writer_server

    t0 = time.perf_counter()
    if not os.path.isdir(opt.img_folder):
        raise SetupError(f"--img_folder {opt.img_folder} is not a folder; give the folder of photos "
                         "that ./process_images.sh prepared")
    entries, missing = scan_folder(opt.img_folder, opt.recursive, lm68=opt.fit_steps > 0, share=(rank, world))
    if only is not None:
        prefix = os.path.join(opt.img_folder, "")
        entries, missing = [e for e in entries if e.image_path[len(prefix):] in only], []
    summary = RunSummary(out_dir=results_dir(opt), img_folder=opt.img_folder, photos_without_detection=missing)
    if opt.skip_existing:
        entries, summary.faces_done_before = without_finished(entries, summary.out_dir, output_suffixes(opt))

    def mark(phase: str) -> None:
        summary.timeline[phase] = time.perf_counter() - t0

    mark("scanned")
    check_results_dir(summary.out_dir, opt.recursive)
    loader = face_loader(opt, entries, device, world)
    bs = loader.batch_size
    # the CUDA context and renderer plugin load in a thread; the DataLoader forks its workers, so
    # that thread starts before the fork only when there are none (a fork beside a thread that
    # holds a lock can hang the child)
    warm = start_warm_up(opt, device) if model is None and loader.num_workers == 0 else None
    batches = iter(loader)  # workers start decoding now, while the model loads
    # CUDA work issued by other threads goes to the device the main thread uses ('cuda' without
    # an index: the main thread's current one, which a new thread does not inherit)
    select = None
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        select = lambda: torch.cuda.set_device(index)  # noqa: E731
        decoder_warm = start_decoder_warm_up(opt, torch.device("cuda", index))
    else:
        decoder_warm = None

    def prepare(batch: dict) -> tuple:
        if decoder_warm is not None:
            decoder_warm.join()  # the decoder's first call is not made from two threads at once
        crops = batch_crops(batch, device) if batch["meta"] else None
        if "first_crops" not in summary.timeline:
            mark("first_crops")  # in the thread: the workers' first batch, on the device
        return batch, crops

    prepared = prefetched(batches, prepare, prefetch_depth(opt.prefetch_batches, device), on_thread_start=select,
                          name=f"crops[{rank}]")
    writer = bar = None
    try:
        n_writers = writer_workers(opt.write_workers, len(entries), world)
        if n_writers > 0:
            launch_writer_server()  # it imports the writers' modules while the model loads
        if model is None:
            model = build_model(opt, device, warm)
            warm_up_network(model, bs, device)
        mark("model_ready")
        out_dir = summary.out_dir
        summary.created_dirs = make_results_dir(out_dir)
        writer = ResultWriter(output_config(opt, model.face_model.face_buf.cpu().numpy(), out_dir),
                              workers=n_writers, max_pending=max(2 * bs, 8 * n_writers))
        writer.start()
        mark("writers_started")
        log.info("%d face(s): %d DataLoader worker(s), %d writer process(es)", len(entries), loader.num_workers,
                 n_writers)
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(entries), unit="face", desc=f"reconstruct[{rank}]" if world > 1 else "reconstruct")

        stops: list[RunStop] = []

        def record(outcomes: list[tuple[str, str | None]]) -> bool:
            """Count the outcomes; True once one has stopped the run (disk full, read-only)."""
            for name, error in outcomes:
                if isinstance(error, RunStop):
                    stops.append(error)
                elif error is None:
                    summary.faces_ok += 1
                    if summary.first_result_at is None:
                        summary.first_result_at = time.perf_counter()
                        mark("first_result")
                else:  # a bad face, a file that could not be written
                    summary.faces_failed += 1
                    summary.failures.append((name, error))
            return bool(stops)

        for batch, crops in prepared:  # crops made in the thread; it may have added to batch["failed"]
            if "first_batch" not in summary.timeline:
                mark("first_batch")
            for it in batch["failed"]:
                summary.faces_failed += 1
                summary.failures.append((it["name"], it["error"]))
            if batch["meta"]:
                images = images_to_float(crops)
                with torch.inference_mode():
                    coeffs = model.predict_coeffs(images)
                if opt.fit_steps > 0:
                    from models.fitting import fit_batch

                    lm68 = batch.get("lm68")
                    coeffs = fit_batch(model, coeffs, images, batch["lm"].to(device), opt.fit_steps,
                                       None if lm68 is None else lm68.to(device), batch.get("has_lm68"))
                if on_batch is not None:
                    on_batch(model, images, coeffs.detach(), batch)
                if record(writer.submit(batch_results(model, coeffs.detach(), batch, opt))):
                    break
            if bar is not None:
                bar.update(len(batch["meta"]) + len(batch["failed"]))
        mark("last_batch")
        record(writer.abort() if stops else writer.finish())  # on a stop, the faces being written finish
        if stops:
            summary.stopped = stop_line(stops[0], summary, len(entries))
        if writer.gave_up:  # a writer process that died may have left a temporary file
            from util.atomic_files import remove_stale_temp_files

            remove_stale_temp_files(summary.out_dir, opt.recursive)
        mark("written")
    finally:
        prepared.stop()
        if writer is not None:
            writer.close(cancel=True)
        shutdown = getattr(batches, "_shutdown_workers", None)  # stop decoding at once on errors
        if shutdown is not None:
            shutdown()
        prepared.close()
        if bar is not None:
            bar.close()
    summary.seconds = time.perf_counter() - t0
    return summary
