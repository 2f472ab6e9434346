"""Reconstruct 3D faces from a folder of photos (same command line as Deep3DFaceRecon_pytorch).

    python test.py --name=<model> --epoch=20 --img_folder=<folder>

reads <folder>/detections/<stem>.txt (written by ./process_images.sh) and writes
checkpoints/<model>/results/<folder name>/epoch_20_000000/<stem>.{png,obj,mat}.
Several GPUs: torchrun --nproc_per_node=N test.py ... (or --gpu_ids 0,1) shards the folder.
Exit code: 0 when every detected face was reconstructed, 1 when some failed, none was found or
the run stopped (disk full, results folder read-only: one line says so), 2 when the run could not
start (the message says what is missing).
"""
from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger(__name__)
LISTED = 20  # photos skipped / faces failed shown in the summary; longer lists go to files beside the results


def main(argv: list[str] | None = None) -> int:
    """Run test.py with ``argv`` (default: ``sys.argv[1:]``); returns the exit code.

    With ``--verbose``, logs the seconds from this call (in a fresh process: its start, less
    the interpreter's own ~0.1 s) to the first face's files and to the end."""
    started = time.perf_counter()
    from options.test_options import parse_test_options

    opt = parse_test_options(argv)
    from options.feature_options import feature_inputs_error
    from util.assets import checkpoint_file, inputs_error

    missing = feature_inputs_error(opt) or inputs_error(
        opt.img_folder, checkpoint_file(opt.checkpoints_dir, opt.name, opt.epoch), opt.bfm_folder, opt.bfm_model)
    if missing:  # before torch loads: a mistyped path is reported at once
        print(f"error: {missing}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if opt.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    from pipeline.runtime import SetupError

    ready = time.perf_counter()  # options parsed, torch imported
    from options.run_specs import run_spec
    from pipeline.ranks import run_ranks
    from util.interrupts import sigterm_as_interrupt

    spec = run_spec(opt)  # the library's settings, made once
    sets = None
    try:
        with sigterm_as_interrupt():
            if (opt.video or opt.group_by) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise SetupError("--video and --group_by run in one process: launch test.py without torchrun")
            if opt.video:
                return _run_videos(opt, spec)
            if opt.group_by:
                summary, sets = _run_image_sets(opt, spec)
                reporting = True
            else:
                summary, reporting = run_ranks(spec)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: files already written are complete; the same command with --skip_existing true "
              "does only the rest", file=sys.stderr)
        return 130
    if reporting and summary.stopped:  # disk full, read-only results: one line says it all
        print(f"error: {summary.stopped}", file=sys.stderr)
    elif reporting:
        listed = LISTED
        try:
            summary.write_long_lists(LISTED)
        except OSError as e:  # the lists stay whole on the terminal
            print(f"warning: could not write the lists of photos skipped and faces failed: {e}", file=sys.stderr)
            listed = None
        if summary.faces_ok == 0:
            summary.remove_empty_dirs()
        print(summary.report(listed))
        if opt.report and summary.faces_ok + summary.faces_done_before > 0:  # a page of no face: none
            write_report_page(summary)
        if sets is not None:
            print(sets.report())
        _log_timing(summary, started, ready)
    return summary.exit_code


def write_report_page(summary) -> None:
    """--report: index.html in the results folder (util.report), and a line saying where (also
    run_pipeline's). A page that cannot be written is a warning: the faces' files are whole."""
    from util.filenames import printable
    from util.report import INSTALL_HINT, write_report

    try:
        path, viewer = write_report(summary.out_dir, summary.failures, summary.photos_without_detection)
    except (OSError, ValueError) as e:  # ValueError: a name the page cannot hold (undecodable bytes)
        print(printable(f"warning: could not write the report: {e}"), file=sys.stderr)
        return
    print(f"report: {printable(path)}")
    if not viewer:
        print(f"report: no 3D viewer (three.js is not vendored): run {INSTALL_HINT}, then --report again")


def _run_image_sets(opt, spec):
    """``--group_by``: the folder's run (one process) with :class:`pipeline.image_sets.SetCollector`
    watching its batches, then one aggregated identity per group. Returns (RunSummary, SetsSummary)."""
    import dataclasses

    from options.feature_options import image_set_settings
    from pipeline.run import run_folder
    from pipeline.runtime import SetupError, resolve_device
    from pipeline.confidence import load_confidence
    from pipeline.image_sets import SetCollector

    settings = image_set_settings(opt)
    if opt.skip_existing:
        raise SetupError("--group_by needs every photo's coefficients: run it without --skip_existing")
    device = resolve_device(opt.device, opt.gpu_ids)
    try:
        collector = SetCollector(settings, opt.img_folder, confidence=load_confidence(settings.confidence, device))
    except ValueError as e:
        raise SetupError(str(e)) from None
    if settings.group_by == "folder":
        spec = dataclasses.replace(spec, recursive=True)
    summary = run_folder(spec, device, on_batch=collector)
    if summary.stopped:  # disk full or read-only: the run's one line says it; no group file either
        return summary, None
    try:
        return summary, collector.write(summary.out_dir)
    except OSError as e:
        raise SetupError(f"writing the image sets' files into {summary.out_dir} failed: {e.strerror or e}") from None


def _run_videos(opt, spec) -> int:
    """``--video``: each video's frames detected and reconstructed (:mod:`pipeline.video`)."""
    from options.feature_options import video_settings
    from options.run_specs import results_dir
    from pipeline.model import build_model
    from pipeline.runtime import SetupError, resolve_device
    from pipeline.video import import_av, list_videos, make_detector, reconstruct_videos
    from util.assets import MissingAssetError
    from util.preprocess import load_lm3d

    try:
        paths = list_videos(opt.video)
        import_av()
        lm3d = load_lm3d(opt.bfm_folder)
    except (ImportError, FileNotFoundError, MissingAssetError) as e:
        raise SetupError(str(e)) from None
    device = resolve_device(opt.device, opt.gpu_ids)
    settings = video_settings(opt, device)
    try:
        detector = make_detector(settings)  # the MTCNN's weights (the detect extra's mtcnn package)
    except (ImportError, FileNotFoundError) as e:
        raise SetupError(str(e)) from None
    model = build_model(spec.model, device)
    summary = reconstruct_videos(paths, model, lm3d, results_dir(opt, folder=opt.video),
                                 settings, detector=detector, progress=opt.verbose)
    print(summary.report())
    return summary.exit_code


def _log_timing(summary, started: float, ready: float) -> None:
    """Log the seconds from ``started`` to ``ready`` (imports and options), to the first face's
    files (``RunSummary.first_result_at``, a ``time.perf_counter()`` like these) and to now."""
    def since(t: float) -> str:
        return f"{t - started:.2f} s"

    first = summary.first_result_at  # None: nothing written
    log.info("start-up: imports and options %s, first results after %s, %d face(s) after %s", since(ready),
             "-" if first is None else since(first), summary.faces_ok, since(time.perf_counter()))
    if summary.timeline:  # the slowest rank's, from the start of its run
        log.info("run timeline: %s", ", ".join(f"{k} {v:.2f} s" for k, v in summary.timeline.items()))


if __name__ == "__main__":
    from util.subprocesses import exit_now

    # Every file is written and closed, the workers and writers have ended: leave without the
    # interpreter's teardown (full garbage collections over every object torch created, ~0.4 s
    # on a CPU core; the CUDA context's release).
    exit_now(main())
