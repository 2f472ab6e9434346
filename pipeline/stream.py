"""Faces fed to a run while it goes on (run_pipeline: detection still running).

A :class:`FaceFeed` thread turns the photos that a source reports as detected into batches of
faces (:func:`pipeline.scan.scan` of just those photos, ``--skip_existing`` included) and puts
them on a multiprocessing queue, which the DataLoader's workers read
(:func:`pipeline.loader.streamed_face_loader`): one DataLoader and one set of writers for the whole
run, each batch loaded as soon as its photos are detected.
"""
from __future__ import annotations

import threading
import time
from typing import Iterable, Protocol

FLUSH_S = 1.0  # a part batch waits at most this long for more faces while the source is idle


class PhotoSource(Protocol):
    """What a streamed run reads: lists of photos (paths relative to the folder, '/'-separated)
    as they are detected, an empty list when none came for a while, ending when no more will
    come; ``expected``: about how many photos there are (sizes the run's processes);
    ``status()``: a few words on its progress (the progress bar shows them)."""

    expected: int

    def __iter__(self): ...

    def status(self) -> str: ...


class FaceFeed:
    """Batches of the faces of ``source``'s photos on :attr:`queue`, from a thread.

    Each batch is a list of (index, :class:`data.image_folder.FaceEntry`), ``batch_size`` long
    except a last one, or one that waited :data:`FLUSH_S` for more; after the last, one None per
    reader.

    Args:
        source: the photos (a :class:`PhotoSource`).
        scan_photos: photos -> (their faces to do, how many of their faces were done before).
        batch_size: faces per batch.

    Attributes:
        faces: faces fed so far. done_before: faces left out as done before.
        error: what the source or ``scan_photos`` raised (the feed ended there, after the faces
            found before), else None.
    """

    def __init__(self, source: Iterable, scan_photos, batch_size: int):
        import multiprocessing

        self.queue = multiprocessing.get_context().Queue()
        self.queue.cancel_join_thread()  # a stopped run's left-over batches never hold up its exit
        self._source, self._scan, self._batch_size, self._readers = source, scan_photos, batch_size, 1
        self.faces = self.done_before = 0
        self.error: BaseException | None = None
        self._stopped = threading.Event()
        self._ended = threading.Lock()
        self._ended_once = False
        self._thread = threading.Thread(target=self._work, name="feed", daemon=True)

    def start(self, readers: int) -> None:
        """Feed from now on, to ``readers`` readers (each ends at a None)."""
        self._readers = readers
        self._thread.start()

    def _work(self) -> None:
        pending: list = []
        since = 0.0
        try:
            for photos in self._source:
                if self._stopped.is_set():
                    return
                if photos:
                    entries, done_before = self._scan(photos)
                    self.done_before += done_before
                    if entries and not pending:
                        since = time.monotonic()
                    pending += entries
                while len(pending) >= self._batch_size or (pending and time.monotonic() - since >= FLUSH_S):
                    pending = self._put(pending)
                    since = time.monotonic()
        except BaseException as e:  # noqa: BLE001 - the run raises it once its readers end
            self.error = e
        finally:
            try:
                while pending and not self._stopped.is_set():  # the faces found before an error too
                    pending = self._put(pending)
            finally:
                self._end()

    def _put(self, pending: list) -> list:
        batch = pending[:self._batch_size]
        self.queue.put(list(enumerate(batch, self.faces)))
        self.faces += len(batch)
        return pending[self._batch_size:]

    def _end(self) -> None:
        with self._ended:
            if not self._ended_once:
                self._ended_once = True
                for _ in range(self._readers):
                    self.queue.put(None)

    def stop(self) -> None:
        """End the feed now: the batches not yet taken are dropped and the readers end."""
        import queue

        self._stopped.set()
        try:
            while True:  # a short wait: what the queue's own thread has not yet passed on goes too
                self.queue.get(timeout=0.05)
        except (queue.Empty, OSError, ValueError):
            pass
        self._end()
