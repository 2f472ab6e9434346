"""Detect and reconstruct a folder of photos in one command, streaming: the faces of photos whose
detections are done are reconstructed while the rest are still being detected.

    ./run_pipeline.sh <folder> --name=<model> --epoch=20 [test.py options] [detection options]

The same as ``./process_images.sh <folder> && python test.py --img_folder <folder> ...`` (same
files, same report, same exit codes), in less time: detection runs in a process of its own
(:func:`detect.folder.run_plan`, batched on CUDA) and reports each photo it finishes; this process
loads the reconstruction model meanwhile, then reconstructs the photos as they are reported
(:func:`pipeline.run.run_folder` fed by :class:`DetectedPhotos`: one DataLoader and one set of
writers for the whole run, each batch of faces loaded as soon as its photos are detected; only
the reported photos' detection folders are read, the folder is never listed again).

Detection options (the rest go to test.py): --detector, --detect_device (default auto), --workers
(detection), --detect_batch_size, --max_side, --min_score, --all-faces, --force_detect; see
``python run_pipeline.py --help`` and docs/detection_speed.md.

Exit status: test.py's (0 all faces reconstructed, 1 some failed or none found, 2 set-up error,
130 interrupted); a detection set-up error is 2 as well. A full or read-only results disk stops
both (detection too) with test.py's one line: the same command finishes the job once there is
room (with --skip_existing true to leave out the faces already written).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time

log = logging.getLogger("run_pipeline")
IDLE_S = 0.5  # DetectedPhotos yields an empty list after this long without a message


def detection_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_pipeline", add_help=False)
    p.add_argument("folder", nargs="?")
    p.add_argument("--detector", default="auto")
    p.add_argument("--detect_device", "--detect-device", default="auto")
    p.add_argument("--workers", default="auto")
    p.add_argument("--detect_batch_size", "--detect-batch-size", type=int, default=0)
    p.add_argument("--max_side", "--max-side", type=int, default=1600)
    p.add_argument("--min_score", "--min-score", type=float, default=None)
    p.add_argument("--all-faces", "--all_faces", dest="all_faces", action="store_true")
    p.add_argument("--force_detect", "--force-detect", action="store_true")
    p.add_argument("-h", "--help", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    dargs, rest = detection_parser().parse_known_args(argv)
    if dargs.help:
        print(__doc__)
        return 0
    if not dargs.folder:
        print("run_pipeline: error: the folder of photos is required: ./run_pipeline.sh <folder> --name=<model> ...",
              file=sys.stderr)
        return 2
    if not os.path.isdir(dargs.folder):
        print(f"run_pipeline: error: {dargs.folder} is not a folder of photos", file=sys.stderr)
        return 2
    from options.test_options import parse_test_options

    opt = parse_test_options(rest + ["--img_folder", dargs.folder])
    if opt.video or opt.group_by:
        print("run_pipeline: error: --video and --group_by are test.py's: run ./process_images.sh, then "
              "python test.py with them", file=sys.stderr)
        return 2
    from options.feature_options import reserved_subfolder_error

    clash = opt.recursive and reserved_subfolder_error(opt.img_folder, opt.report, False)
    if clash:
        print(f"run_pipeline: error: {clash}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if opt.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    from detect.mtcnn_tf import tensorflow_quiet
    from detect.registry import resolve_detector_device
    from detect.settings import PrepareOptions

    try:
        workers = 0 if dargs.workers == "auto" else int(dargs.workers)
        # CUDA where the machine shows a GPU is checked by the detection process, as its engines start
        detector, device = resolve_detector_device(dargs.detector, dargs.detect_device, verify=False)
        cpu_detector = resolve_detector_device(dargs.detector, "cpu")[0] if dargs.detect_device == "auto" else None
    except ValueError as e:
        print(f"run_pipeline: error: {e}", file=sys.stderr)
        return 2
    if not opt.verbose:
        tensorflow_quiet()
    options = PrepareOptions(detector=detector, all_faces=dargs.all_faces, min_score=dargs.min_score,
                             max_side=dargs.max_side, recursive=opt.recursive, force=dargs.force_detect,
                             workers=workers, device=device, batch_size=dargs.detect_batch_size,
                             verbose=opt.verbose)
    fallback = None  # --detect_device auto: the CPU, should torch see no CUDA after all
    if cpu_detector is not None and device != "cpu":
        fallback = dataclasses.replace(options, detector=cpu_detector, device="cpu")
    from options.run_specs import run_spec
    from util.interrupts import sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():
            return run(run_spec(opt), options, fallback)
    except KeyboardInterrupt:
        print("run_pipeline: interrupted: files already written are complete; the same command does the rest "
              "(add --skip_existing true to leave out faces already reconstructed)", file=sys.stderr)
        return 130


def run(spec, options, fallback=None, detection=None) -> int:
    """Detection (``options``, a :class:`detect.settings.PrepareOptions`; ``fallback``, the same on
    the CPU should torch see no CUDA after all) in a process of its own, reconstruction of ``spec``
    (a :class:`pipeline.settings.RunSpec`) here, fed the photos as they are detected; prints both
    summaries and returns the exit code. ``detection``: the detection process's function (None:
    :func:`detect.folder.detect_to_queue`; tests give stand-ins with its messages)."""
    import multiprocessing

    from util.subprocesses import main_module_hidden

    if detection is None:
        from detect.folder import detect_to_queue as detection
    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")  # CUDA and TensorFlow do not survive fork
    queue = ctx.Queue()
    detector = ctx.Process(target=detection, args=(spec.img_folder, options, queue, None, fallback),
                           name="detection")
    with main_module_hidden():
        detector.start()
    # torch and the model are imported once the detection process (and its engines) are on their way
    from pipeline.model import build_model, warm_up_network
    from pipeline.run import run_folder
    from pipeline.runtime import SetupError, resolve_device

    detected = DetectedPhotos(queue, detector.is_alive)
    try:
        device = resolve_device(spec.device, spec.gpu_ids)
        model = build_model(spec.model, device)  # while the first photos are detected
        warm_up_network(model, spec.loader.batch_size_on(device), device)
        log.info("model ready %.2f s after the start", time.perf_counter() - t0)
        total = None
        if detected.expected or not detected.failed:  # a detection set-up error: nothing written
            total = run_folder(spec, device, model=model, source=detected)
            log.info("reconstruction ended %.2f s after the start", time.perf_counter() - t0)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if detected.final is None and detector.is_alive():  # stopped early: detection too (its Ctrl-C path)
            detector.terminate()
        detector.join(timeout=10)
        if detector.is_alive():
            detector.kill()
            detector.join()
        log.info("detection process ended %.2f s after the start", time.perf_counter() - t0)
    final = detected.final
    if detected.failed:
        done = f"; the {total.faces_ok} face(s) of the photos detected before it are written in {total.out_dir}" \
            if total is not None and total.faces_ok else ""
        print(f"run_pipeline: detection failed: {final[1]}{done}", file=sys.stderr)
        return 130 if final[1] == "interrupted" else 2
    if total.stopped:  # one line says what, where, what is left and how to finish (as test.py does)
        print(f"error: {total.stopped}", file=sys.stderr)
        return total.exit_code
    _, det_summary, report_path = final
    skipped = ", ".join(f"{k} {v}" for k, v in det_summary["skipped"].items()) or "none"
    print(f"detection: {det_summary['images']} photos, {det_summary['ok']} with a face, {det_summary['reused']} "
          f"up to date (kept), skipped: {skipped}; report: {report_path}")
    total.seconds = time.perf_counter() - t0
    print(total.report())
    if spec.outputs.report and total.faces_ok + total.faces_done_before > 0:
        from test import write_report_page

        write_report_page(total)
    return total.exit_code


class DetectedPhotos:
    """The detection process's messages (:func:`detect.folder.detect_to_queue`) as a
    :class:`pipeline.stream.PhotoSource`: lists of photos as they are detected (an empty one after
    :data:`IDLE_S` without any), ending at its last message, kept in :attr:`final` (a process that
    died without one counts as failed)."""

    _NOTHING = object()  # no message came

    def __init__(self, queue, alive):
        self._queue, self._alive = queue, alive
        self.final: tuple | None = None
        self._early: list[str] = []  # photos that came before the run asked for them
        self._kept = 0  # photos with a detection from an earlier run
        self._to_detect: int | None = None
        self._detected = 0

    @property
    def expected(self) -> int:
        """The photos kept with a face plus those to detect (0 if detection failed first); waits
        for the count."""
        while self._to_detect is None and self.final is None:
            msg = self._get()
            if msg is not self._NOTHING:
                self._early += msg
        return self._kept + (self._to_detect or 0)

    @property
    def failed(self) -> bool:
        """Detection's last message came and says it failed."""
        from detect.folder import DETECTION_FAILED

        return self.final is not None and self.final[0] == DETECTION_FAILED

    def status(self) -> str:
        return f"{self._detected} of {self._to_detect or 0} photos detected"

    def __iter__(self):
        if self._early:
            yield self._early
            self._early = []
        while self.final is None:
            photos, msg = [], self._get()
            while msg is not self._NOTHING:  # every message waiting, in one list
                photos += msg
                msg = self._get(block=False)
            yield photos

    def _get(self, block: bool = True):
        """The photos of the next message (blocking for at most :data:`IDLE_S`): a list, or
        ``_NOTHING`` if none came. The counts are kept; the last message goes to :attr:`final`."""
        import queue as queue_mod

        try:
            msg = self._queue.get(timeout=IDLE_S) if block else self._queue.get_nowait()
        except queue_mod.Empty:
            if not block or self._alive():
                return self._NOTHING
            from detect.folder import DETECTION_FAILED  # waited in vain, and the process is gone

            msg = (DETECTION_FAILED, "the detection process ended without a word (killed?)")
        if isinstance(msg, tuple):
            self.final = msg
            return self._NOTHING
        if isinstance(msg, int):
            self._to_detect = msg
            return []
        if self._to_detect is None:  # before the count: the photos kept from an earlier run
            self._kept += len(msg)
        else:  # one photo done (an empty list: without a face)
            self._detected += 1
        return msg


if __name__ == "__main__":
    from util.subprocesses import exit_now

    exit_now(main())  # as test.py: the files are written, the processes ended; no interpreter teardown
