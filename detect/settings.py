"""What a process_images run does (:class:`PrepareOptions`) and the photos it has to do (:class:`Plan`)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PrepareOptions:
    """What process_images does; defaults are the CLI's."""

    detector: str = "mtcnn"
    all_faces: bool = False
    landmarks68: bool = False
    dlib_predictor: str | None = None
    min_score: float | None = None  # None: the detector's default (mtcnn/torch 0.9, dlib 0.0)
    max_side: int = 1600
    recursive: bool = False
    force: bool = False
    debug_vis: bool = False
    workers: int = 1  # processes (CPU) or loader processes (batched); 0: auto, see worker_count
    device: str = "cpu"  # "cpu", or "cuda"/"cuda:N" for the batched torch engine (see resolve_device)
    batch_size: int = 0  # photos per detect_batch call of the batched engine; 0: its default
    verbose: bool = False  # let TensorFlow's log lines through

    def settings(self, min_score: float) -> dict:
        """The options that change the outputs; a report row is reused only when they match."""
        return {"detector": self.detector, "all_faces": self.all_faces, "landmarks68": self.landmarks68,
                "min_score": min_score, "max_side": self.max_side}


@dataclass
class Plan:
    """Photos of a folder split into rows already final (skips, reused) and work to do."""

    folder: str
    options: PrepareOptions
    report_path: str
    min_score: float
    rows: dict[str, dict] = field(default_factory=dict)  # rel path -> report row
    todo: list[str] = field(default_factory=list)
