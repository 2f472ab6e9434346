"""Prepare a folder of photos for test.py: find 5 facial points in each, never touching the photos.

    ./process_images.sh <folder> [--device cuda] [--all-faces] [--landmarks68] [--workers 2] [--debug-vis] ...

Writes <folder>/detections/<stem>.txt (5 lines "x y"), optional landmarks/ and debug_vis/
folders and <folder>/process_report.json; see docs/process_images.md and detect/folder.py.

Exit status: 0 when the run completed (photos without a face are reported, not errors);
1 when nothing could be processed (no photo found or none readable) or, with --strict, when
any photo was skipped; 2 for a usage or set-up error (bad option, missing folder, detector
package or dlib predictor, outputs that cannot be written); 130 when interrupted (Ctrl-C /
SIGTERM) - the report then lists the photos done so far and a re-run resumes.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from util.interrupts import sigterm_as_interrupt

EXIT_OK, EXIT_NOTHING, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def build_parser() -> argparse.ArgumentParser:
    from detect.registry import DETECTORS

    p = argparse.ArgumentParser(
        prog="process_images",
        description="Detect 5 facial landmarks in every photo of a folder for test.py. "
                    "Photos are only read; outputs go to <folder>/detections, landmarks/, debug_vis/ "
                    "and <folder>/process_report.json.")
    p.add_argument("folder", nargs="?", help="folder of photos (.jpg .jpeg .png .bmp .webp .tif .tiff)")
    p.add_argument("--img_folder", dest="img_folder", help="same as the positional folder (test.py's name)")
    p.add_argument("--recursive", action="store_true", help="also process sub-folders (mirrored output layout)")
    p.add_argument("--detector", default="auto", choices=["auto", *sorted(DETECTORS)],
                   help="face detector backend (default auto: torch, batched, on CUDA; else the mtcnn package)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when present and the detector runs there), cpu, cuda or cuda:N; "
                        "on CUDA the PyTorch MTCNN detects batches of photos")
    p.add_argument("--all-faces", "--all_faces", dest="all_faces", action="store_true",
                   help="write every face: the chosen one as <stem>.txt, others as <stem>__face02.txt, ...")
    p.add_argument("--landmarks68", action="store_true",
                   help="also write dlib 68-point landmarks to <folder>/landmarks/<stem>.txt")
    p.add_argument("--dlib_predictor", "--dlib-predictor", dest="dlib_predictor", metavar="PATH",
                   help="dlib shape_predictor_68_face_landmarks.dat (default: the copy in the "
                        "face_recognition_models package)")
    p.add_argument("--min_score", "--min-score", dest="min_score", type=float, default=None,
                   help="faces scoring lower are weak and not written (default: 0.9 for mtcnn/torch, 0 for dlib)")
    p.add_argument("--max_side", "--max-side", dest="max_side", type=int, default=1600,
                   help="detect on a copy downscaled to this longer side; coordinates stay in original pixels")
    p.add_argument("--workers", type=_workers, default=None,
                   help="CPU: detector processes, each with cores/workers threads; CUDA: engine processes "
                        "sharing the GPU, each reading photos with cores/workers threads (default auto: from "
                        "the cores and the number of photos; on CUDA half the cores less one, at most 6)")
    p.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int, default=0,
                   help="photos per detection batch on CUDA (default 32); on the CPU, > 1 runs the torch port in batches")
    p.add_argument("--force", action="store_true", help="recompute photos whose outputs are up to date")
    p.add_argument("--strict", action="store_true", help="exit with status 1 if any photo was skipped")
    p.add_argument("--debug-vis", "--debug_vis", dest="debug_vis", action="store_true",
                   help="draw boxes and points on each photo, saved to <folder>/debug_vis/<stem>.jpg")
    p.add_argument("--report", metavar="PATH", help="report file (default <folder>/process_report.json)")
    p.add_argument("--no-progress", "--no_progress", dest="progress", action="store_false",
                   help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="log each skipped photo")
    return p


def _workers(value: str) -> int | None:
    """--workers: a count, or None for auto."""
    if value == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {value!r}") from None


def main(argv: list[str] | None = None) -> int:
    """The command; returns its exit status (its worker processes have ended)."""
    return _main(argv, wait_for_workers=True)[0]


def run(argv: list[str] | None = None) -> None:
    """The command as a program: :func:`main`, then the exit - at once, without waiting for
    worker processes that are still going away once every photo is done (15 CUDA engines take
    about 1.1 s to release their contexts; docs/detection_speed.md). ``D3DFR_WAIT_FOR_WORKERS=1``
    waits for them (benchmarks/bench_detect_pipeline.py compares the two)."""
    code, workers_left = _main(argv, wait_for_workers=os.environ.get("D3DFR_WAIT_FOR_WORKERS") == "1")
    if workers_left:
        from util.subprocesses import exit_now

        exit_now(code)
    sys.exit(code)


def _main(argv: list[str] | None, wait_for_workers: bool) -> tuple[int, bool]:
    """:func:`main`; returns (exit status, whether worker processes were left ending on their own)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    folder = args.folder or args.img_folder
    if args.folder and args.img_folder and args.folder != args.img_folder:
        parser.error("give the folder once: positionally or with --img_folder")
    if not folder:
        parser.error("the folder of photos is required")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")

    from detect.base import DetectorUnavailableError
    from detect.folder import plan_folder, run_plan, start_run_checking_cuda
    from detect.mtcnn_tf import tensorflow_quiet
    from detect.registry import resolve_detector_device
    from detect.settings import PrepareOptions
    from util.filenames import printable

    if not args.verbose:
        tensorflow_quiet()  # before any TensorFlow import, here or in the workers
    try:
        if args.max_side < 64:
            raise ValueError(f"--max_side must be >= 64, got {args.max_side}")
        if args.workers is not None and args.workers < 1:
            raise ValueError(f"--workers must be >= 1 (or auto), got {args.workers}")
        if args.batch_size < 0:
            raise ValueError(f"--batch_size must be >= 1 (or 0 for the default), got {args.batch_size}")
        # CUDA where the machine shows a GPU is checked below, while the engines start
        detector, device = resolve_detector_device(args.detector, args.device, verify=False)
        options = PrepareOptions(
            detector=detector, all_faces=args.all_faces, landmarks68=args.landmarks68,
            dlib_predictor=args.dlib_predictor, min_score=args.min_score, max_side=args.max_side,
            recursive=args.recursive, force=args.force, debug_vis=args.debug_vis, workers=args.workers or 0,
            device=device, batch_size=args.batch_size, verbose=args.verbose)
        fallback = None  # --device auto: the CPU, should torch see no CUDA after all
        if args.device == "auto" and device != "cpu":
            cpu_detector, _ = resolve_detector_device(args.detector, "cpu")
            fallback = dataclasses.replace(options, detector=cpu_detector, device="cpu")
        plan, started = start_run_checking_cuda(plan_folder(folder, options, report_path=args.report), fallback)
    except (ValueError, NotADirectoryError, FileNotFoundError, DetectorUnavailableError) as e:
        print(f"process_images: error: {e}", file=sys.stderr)
        return EXIT_USAGE, False
    if not plan.rows and not plan.todo:
        if started is not None:
            started.stop()
        print(f"process_images: no photos found in {folder} "
              "(.jpg .jpeg .png .bmp .webp .tif .tiff; --recursive for sub-folders)", file=sys.stderr)
        return EXIT_NOTHING, False

    bar = None
    if args.progress and plan.todo:
        from tqdm import tqdm

        bar = tqdm(total=len(plan.todo), unit="img", desc="detecting", file=sys.stderr, dynamic_ncols=True)

    def on_result(row: dict) -> None:
        if row["status"] != "ok":
            logging.getLogger("process_images").info("%s: %s (%s)", printable(row["path"]), row["reason"],
                                                     printable(row["detail"]))
        if bar is not None:
            bar.update(1)

    try:
        with sigterm_as_interrupt():
            report = run_plan(plan, on_result=on_result, started=started, wait_for_workers=wait_for_workers)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        print(f"\nprocess_images: interrupted; report of the photos done so far: {plan.report_path} "
              "(run again to resume)", file=sys.stderr)
        return EXIT_INTERRUPTED, False
    except (DetectorUnavailableError, OSError) as e:  # missing package/predictor, unwritable folder
        if bar is not None:
            bar.close()
        print(f"process_images: error: {e}", file=sys.stderr)
        return EXIT_USAGE, False
    if bar is not None:
        bar.close()

    s = report.summary
    skipped = ", ".join(f"{k} {v}" for k, v in s["skipped"].items()) or "none"
    print(f"process_images: {s['images']} photos, {s['ok']} with a face, {s['faces_written']} detection "
          f"file(s), {s['reused']} up to date (kept), skipped: {skipped}. {s['seconds']:.1f} s")
    print(f"process_images: report: {printable(report.path)}")
    if s["loaded"] == 0 and s["reused"] == 0:
        print("process_images: error: no photo could be read", file=sys.stderr)
        return EXIT_NOTHING, report.workers_left
    if args.strict and s["skipped"]:
        print("process_images: --strict: some photos were skipped (see the report)", file=sys.stderr)
        return EXIT_NOTHING, report.workers_left
    return EXIT_OK, report.workers_left


if __name__ == "__main__":
    run()
