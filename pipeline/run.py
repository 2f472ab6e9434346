"""Reconstruct every detected face of a folder: the run behind test.py, a loop over stages.

Stages, each a function with one job: :func:`pipeline.scan.scan` (the folder, and the faces
already done), :func:`pipeline.loader.face_loader` (decode and align in worker processes),
:func:`ready_crops` (a batch's crops on the device, in a prefetch thread), :func:`predict`
(the network), :func:`fit` (optional per-face fitting), :func:`pipeline.render.batch_results`
(face model and renderer -> per-face numpy payloads), the writers
(:class:`util.results_io.ResultWriter`) and :class:`Tally` (the outcomes into the
:class:`pipeline.summary.RunSummary` that test.py reports).
"""
from __future__ import annotations

import logging
import time

import torch

from data.image_folder import FaceBatch
from pipeline.loader import face_loader
from pipeline.model import build_model, start_decoder_warm_up, start_warm_up, warm_up_network
from pipeline.outputs import output_config
from pipeline.render import batch_results
from pipeline.scan import check_results_dir, make_results_dir, scan
from pipeline.settings import RunSpec
from pipeline.summary import RunSummary, stop_line
from pipeline.workers import prefetch_depth, writer_workers

log = logging.getLogger(__name__)


class Tally:
    """Counts a run's outcomes into its :class:`RunSummary` and marks its timeline.

    Args:
        summary: the summary to fill (its ``timeline`` is seconds since ``t0``).
        t0: the run's start, a ``time.perf_counter()``.
    """

    def __init__(self, summary: RunSummary, t0: float):
        self.summary, self.t0 = summary, t0
        self.stops: list = []  # util.results_io.RunStop: a full or read-only results disk

    def mark(self, phase: str, once: bool = False) -> None:
        """Record that ``phase`` ended now (``once``: unless it was recorded before)."""
        if not (once and phase in self.summary.timeline):
            self.summary.timeline[phase] = time.perf_counter() - self.t0

    def failed(self, failures) -> None:
        """Count faces that failed before the network: (name, reason) pairs."""
        for name, reason in failures:
            self.summary.faces_failed += 1
            self.summary.failures.append((name, reason))

    def record(self, outcomes: list[tuple[str, str | None]]) -> bool:
        """Count the writers' outcomes, (name, None | reason | RunStop) each; True once one has
        stopped the run."""
        from util.results_io import RunStop

        s = self.summary
        for name, error in outcomes:
            if isinstance(error, RunStop):
                self.stops.append(error)
            elif error is None:
                s.faces_ok += 1
                if s.first_result_at is None:
                    s.first_result_at = time.perf_counter()
                    self.mark("first_result")
            else:  # a bad face, a file that could not be written
                self.failed([(name, error)])
        return bool(self.stops)


def ready_crops(batch: FaceBatch, device: torch.device) -> tuple[FaceBatch, torch.Tensor | None]:
    """(the batch, its (B, 3, 224, 224) uint8 crops on ``device``) as
    :func:`data.image_folder.batch_crops` makes them; (batch, None) for a batch without a good face."""
    from data.image_folder import batch_crops

    return batch_crops(batch, device) if batch.meta else (batch, None)


def predict(model, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The network on (B, 3, 224, 224) uint8 crops -> ((B, 3, 224, 224) float32 crops in 0..1,
    (B, 257) float32 coefficients)."""
    from data.image_folder import images_to_float

    images = images_to_float(crops)
    with torch.inference_mode():
        return images, model.predict_coeffs(images)


def fit(model, steps: int, coeffs: torch.Tensor, images: torch.Tensor, batch: FaceBatch,
        loss: str = "front") -> torch.Tensor:
    """``steps`` of per-face fitting (:func:`models.fitting.fit_batch`, ``loss`` as
    :func:`models.fitting.fit_config`'s) to the batch's 68 landmarks where it has them, else its 5;
    returns the (B, 257) coefficients (``coeffs`` when steps is 0)."""
    if steps <= 0:
        return coeffs
    from models.fitting import fit_batch, fit_config

    lm68 = batch.lm68
    return fit_batch(model, coeffs, images, batch.lm.to(images.device), steps,
                     None if lm68 is None else lm68.to(images.device), batch.has_lm68, config=fit_config(loss))


def _cuda_thread_setup(device: torch.device, decode_on_device: bool):
    """(what a helper thread runs first so that its CUDA work goes to the main thread's device, the
    nvJPEG warm-up thread); (None, None) off CUDA."""
    if device.type != "cuda":
        return None, None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return (lambda: torch.cuda.set_device(index)), start_decoder_warm_up(torch.device("cuda", index), decode_on_device)


def run_folder(spec: RunSpec, device: torch.device, rank: int = 0, world: int = 1, progress: bool = True,
               model=None, on_batch=None, source=None) -> RunSummary:
    """Reconstruct every detected face of ``spec.img_folder`` on ``device`` (this rank's share).

    The DataLoader's workers start first (they decode and align while the model loads), then the
    model and the writers; a thread readies each batch's crops on the device
    (:func:`pipeline.workers.prefetch_depth` batches ahead) while the main thread runs the network
    and hands numpy payloads to the writers. ``RunSummary.timeline`` records when each phase ended.

    Args:
        spec: the run's settings.
        device: where the network, face model and renderer run.
        rank, world: this process's share of the folder (every world-th photo from rank).
        progress: show a progress bar.
        model: an already built model (run_pipeline's); None: built here from ``spec.model``.
        on_batch: ``on_batch(model, images, coeffs, batch)`` sees each batch's (B, 3, 224, 224)
            float crops and final (B, 257) coefficients with the collated batch
            (:class:`pipeline.image_sets.SetCollector`).
        source: the photos to reconstruct as they come (a :class:`pipeline.stream.PhotoSource`:
            run_pipeline's detection) instead of the folder's detected photos: the faces of each
            are loaded once it comes (:class:`pipeline.stream.FaceFeed`), batches in the order
            they are ready.

    Returns:
        the run's summary; writing stopped by a full or read-only disk is its ``stopped`` line.

    Raises:
        SetupError: the folder, the results folder, the model's files or the output settings do
        not allow a run (before any face is written).
    """
    from util.prefetch import prefetched
    from util.results_io import ResultWriter, launch_writer_server
    from util.subprocesses import remove_dead_socket_folders

    t0 = time.perf_counter()
    if source is None:
        entries, summary = scan(spec, rank, world)
        n_faces = len(entries)
    else:
        summary, n_faces = RunSummary(out_dir=spec.out_dir, img_folder=spec.img_folder), source.expected
    tally = Tally(summary, t0)
    tally.mark("scanned")
    batch_size = spec.loader.batch_size_on(device)
    check_results_dir(summary.out_dir, spec.recursive)
    remove_dead_socket_folders()  # a killed run's forkserver socket folder, where its exit hook did not run
    if source is None:
        feed, loader = None, face_loader(spec.loader, spec.model.bfm_folder, entries, device, world)
    else:
        feed, loader = _streamed_loader(spec, device, source, batch_size)
    # the CUDA context and renderer plugin load in a thread; the DataLoader forks its workers, so
    # that thread starts before the fork only when there are none (a fork beside a thread that
    # holds a lock can hang the child)
    warm = start_warm_up(device, spec.model.use_opengl) if model is None and loader.num_workers == 0 else None
    batches = iter(loader)  # workers start decoding now, while the model loads
    if feed is not None:
        feed.start(readers=max(1, loader.num_workers))  # its thread once the workers are forked
    select, decoder_warm = _cuda_thread_setup(device, spec.loader.decode_on_device)

    def prepare(batch: FaceBatch) -> tuple[FaceBatch, torch.Tensor | None]:
        if decoder_warm is not None:
            decoder_warm.join()  # the decoder's first call is not made from two threads at once
        out = ready_crops(batch, device)
        tally.mark("first_crops", once=True)  # in the thread: the workers' first batch, on the device
        return out

    prepared = prefetched(batches, prepare, prefetch_depth(spec.loader.prefetch_batches, device),
                          on_thread_start=select, name=f"crops[{rank}]")
    writer = bar = None
    try:
        n_writers = writer_workers(spec.write_workers, n_faces, world)
        if n_writers > 0:
            launch_writer_server()  # it imports the writers' modules while the model loads
        if model is None:
            model = build_model(spec.model, device, warm)
            warm_up_network(model, min(batch_size, max(1, n_faces)), device)  # the first batch's size
        tally.mark("model_ready")
        summary.created_dirs = make_results_dir(summary.out_dir)
        writer = ResultWriter(output_config(spec.outputs, spec.model, model.face_model.face_buf.cpu().numpy(),
                                            summary.out_dir),
                              workers=n_writers, max_pending=max(2 * batch_size, 8 * n_writers))
        writer.start()
        tally.mark("writers_started")
        log.info("%d face(s)%s: %d DataLoader worker(s), %d writer process(es)", n_faces,
                 "" if feed is None else " expected", loader.num_workers, n_writers)
        bar = _progress_bar(n_faces if feed is None else None, rank, world) if progress else None
        for batch, crops in prepared:  # crops made in the thread, with faces that failed there in batch.failed
            tally.mark("first_batch", once=True)
            tally.failed(batch.failed)
            if batch.meta:
                images, coeffs = predict(model, crops)
                coeffs = fit(model, spec.fit_steps, coeffs, images, batch, spec.fit_loss).detach()
                if on_batch is not None:
                    on_batch(model, images, coeffs, batch)
                if tally.record(writer.submit(batch_results(model, coeffs, batch, spec.outputs))):
                    break
            if bar is not None:
                if feed is not None:
                    bar.set_postfix_str(source.status(), refresh=False)
                bar.update(len(batch.meta) + len(batch.failed))
        tally.mark("last_batch")
        if feed is not None:
            n_faces, summary.faces_done_before = feed.faces, feed.done_before
        _finish_writes(writer, tally, n_faces, spec.recursive)
        tally.mark("written")
        if feed is not None and feed.error is not None:
            raise feed.error
    finally:
        if feed is not None:
            feed.stop()  # the readers end, so that the workers stop at once
        prepared.stop()
        if writer is not None:
            writer.close(cancel=True)
        shutdown = getattr(batches, "_shutdown_workers", None)  # stop decoding at once on errors
        if shutdown is not None:
            shutdown()
        prepared.close()
        if bar is not None:
            bar.close()
        remove_dead_socket_folders()  # any that this run's own ended workers left
    summary.seconds = time.perf_counter() - t0
    return summary


def _streamed_loader(spec: RunSpec, device: torch.device, source, batch_size: int):
    """(the :class:`pipeline.stream.FaceFeed` of ``source``'s photos in batches of ``batch_size``,
    the DataLoader reading it)."""
    from pipeline.loader import streamed_face_loader
    from pipeline.stream import FaceFeed

    def scan_photos(photos: list[str]) -> tuple[list, int]:
        entries, part = scan(spec, only=set(photos))
        return entries, part.faces_done_before

    feed = FaceFeed(source, scan_photos, batch_size)
    return feed, streamed_face_loader(spec.loader, spec.model.bfm_folder, feed.queue, device, source.expected,
                                      batch_size)


def _progress_bar(total: int | None, rank: int, world: int):
    from tqdm import tqdm

    count = {} if total is not None else {"bar_format": "{desc}: {n_fmt} faces [{elapsed}, {rate_fmt}{postfix}]"}
    return tqdm(total=total, unit="face", desc=f"reconstruct[{rank}]" if world > 1 else "reconstruct", **count)


def _finish_writes(writer, tally: Tally, n_faces: int, recursive: bool) -> None:
    """Wait for the writers (on a stop: only the faces being written) and count their outcomes;
    a stop becomes the summary's ``stopped`` line, and a dead writer's temporary files go."""
    stops = tally.stops
    tally.record(writer.abort() if stops else writer.finish())
    if stops:
        tally.summary.stopped = stop_line(stops[0], tally.summary, n_faces)
    if writer.gave_up:  # a writer process that died may have left a temporary file
        from util.atomic_files import remove_stale_temp_files

        remove_stale_temp_files(tally.summary.out_dir, recursive)
