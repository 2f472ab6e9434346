"""Reconstruct every detected face of a folder: the run behind test.py, as a loop over stages."""
from __future__ import annotations

import logging
import os
import time

import torch

from pipeline.loader import face_loader
from pipeline.model import build_model, start_decoder_warm_up, start_warm_up, warm_up_network
from pipeline.outputs import output_config, output_suffixes
from pipeline.render import batch_results
from pipeline.runtime import SetupError
from pipeline.scan import check_results_dir, make_results_dir, results_dir, without_finished
from pipeline.summary import RunSummary, stop_line
from pipeline.workers import prefetch_depth, writer_workers

log = logging.getLogger(__name__)


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
