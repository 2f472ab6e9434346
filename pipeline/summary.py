"""What a run did: :class:`RunSummary` (counts, failures, timeline), its terminal report, the
lists written beside the results, and the one line of a run that a full disk stopped."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from util.filenames import printable


SKIPPED_LIST, FAILED_LIST = "skipped_photos.txt", "failed_faces.txt"  # beside the results, when long


@dataclass
class RunSummary:
    """Counts of one run (or one rank of a multi-GPU run; :meth:`merge` adds another's).

    Attributes:
        faces_ok, faces_failed: faces written, faces that failed (``failures``: (photo or face, reason)).
        photos_without_detection: photos skipped, no detection file.
        faces_done_before: faces left out by ``--skip_existing`` (their outputs were all there).
        out_dir, img_folder: the results folder and the folder of photos.
        created_dirs: folders the run made for its results.
        seconds: the run's wall time; first_result_at: ``time.perf_counter()`` when the first
            face's files were written (None: none); timeline: phase -> seconds from the start.
        stopped: why the run stopped before the end (disk full, read-only results), one line.
    """

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


def stop_line(reason, summary: "RunSummary", n_faces: int) -> str:
    """The one line of a run that a :class:`util.results_io.RunStop` ended: why, what was done,
    what is left and about how much space it needs, how to finish."""
    from util.results_io import human_bytes

    left = max(0, n_faces - summary.faces_ok - summary.faces_failed)
    need = f" (about {human_bytes(left * reason.face_bytes)} more)" if reason.face_bytes and left else ""
    failed = f", {summary.faces_failed} failed" if summary.faces_failed else ""
    return (f"{reason}; {summary.faces_ok} face(s) written{failed}, {left} left{need}; once there is "
            "room (or the folder is writable), the same command with --skip_existing true finishes the job")
