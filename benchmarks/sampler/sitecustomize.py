"""A wall-clock sampling profiler for every Python process of a run (benchmarks only).

Put this folder first on PYTHONPATH and set D3DFR_SAMPLE_DIR: every interpreter that starts
(the command, spawned engines, the writers' forkserver) imports this module at start-up through
``site``, and every process forked from one (DataLoader workers, forkserver children) restarts its
sampler after the fork. Each process samples all its threads' Python stacks every
D3DFR_SAMPLE_INTERVAL seconds (default 0.005) and writes ``<pid>.json`` into the folder every
second, at exit and at ``os._exit``. ``benchmarks/sampling_profile.py`` sums them up.

What a sample shows is the Python frame a thread is in: time spent in C (CUDA launches, numpy,
decoding) is charged to the Python line that called it, and a thread that waits (a lock, a queue,
a sleep) shows its waiting frame. CPU seconds are kept per thread (at the last dump) and per
process over time, so the summary can say which processes used the cores when. The sampler thread takes the GIL for each sample (tens of
microseconds): runs with it are a little slower than without it.
"""
import json
import os
import re
import sys
import threading
import time

_DIR = os.environ.get("D3DFR_SAMPLE_DIR")
_INTERVAL = float(os.environ.get("D3DFR_SAMPLE_INTERVAL", "0.005"))
_BUCKET_S = 0.25  # the timeline's resolution
_DEPTH = 30  # frames kept per stack


def _short(path: str) -> str:
    """``lib:torch/nn/...`` (installed packages), ``py:threading.py`` (the standard library), or the
    path relative to D3DFR_SAMPLE_ROOT (default: the working folder)."""
    for marker in ("site-packages/", "dist-packages/"):
        i = path.find(marker)
        if i >= 0:
            return "lib:" + path[i + len(marker):]
    m = re.search(r"/lib/python3\.\d+/", path)
    if m:
        return "py:" + path[m.end():]
    root = os.environ.get("D3DFR_SAMPLE_ROOT", os.getcwd())
    return os.path.relpath(path, root) if path.startswith(root) else path


class _Sampler:
    def __init__(self) -> None:
        self.pid = os.getpid()
        self.t0 = time.time()
        self.stacks: dict[str, int] = {}
        self.timeline: dict[int, dict[str, int]] = {}
        self.samples = 0
        self.cpu: dict[int, float] = {}  # timeline bucket -> the process's CPU seconds at its last sample
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, name="sampler", daemon=True)
        self.thread.start()

    def _sample(self, me: int) -> None:
        names = {t.ident: t.name for t in threading.enumerate()}
        now = time.time()
        b = int((now - self.t0) / _BUCKET_S)
        bucket = self.timeline.setdefault(b, {})
        t = os.times()
        self.cpu[b] = t.user + t.system
        for tid, frame in sys._current_frames().items():
            if tid == me:
                continue
            parts, f = [], frame
            while f is not None and len(parts) < _DEPTH:
                parts.append(f"{_short(f.f_code.co_filename)}:{f.f_code.co_name}")
                f = f.f_back
            leaf = f"{parts[0]}:{frame.f_lineno}" if parts else "?"
            name = names.get(tid, "thread")
            key = name + ";" + ";".join(reversed(parts[1:])) + (";" if len(parts) > 1 else "") + leaf
            self.stacks[key] = self.stacks.get(key, 0) + 1
            top = f"{name} {leaf}"
            bucket[top] = bucket.get(top, 0) + 1
        self.samples += 1

    def _loop(self) -> None:
        me = threading.get_ident()
        last = time.monotonic()
        while True:
            time.sleep(_INTERVAL)
            with self.lock:
                self._sample(me)
            if time.monotonic() - last >= 1.0:
                self.dump()
                last = time.monotonic()

    def dump(self) -> None:
        if os.getpid() != self.pid:
            return
        with self.lock:
            data = {"pid": self.pid, "argv": sys.argv, "process": _process_name(), "t0": self.t0,
                    "end": time.time(), "interval": _INTERVAL, "bucket_s": _BUCKET_S, "samples": self.samples,
                    "stacks": self.stacks, "timeline": {str(k): v for k, v in self.timeline.items()},
                    "cpu": {str(k): v for k, v in self.cpu.items()}, "thread_cpu_s": _thread_cpu()}
        path = os.path.join(_DIR, f"{self.pid}.json")
        try:
            with open(path + ".tmp", "w") as f:
                json.dump(data, f)
            os.replace(path + ".tmp", path)
        except OSError:
            pass


def _thread_cpu() -> dict[str, float]:
    """CPU seconds of each live thread, by name (names that repeat are summed)."""
    out: dict[str, float] = {}
    for t in threading.enumerate():
        try:
            sec = time.clock_gettime(time.pthread_getcpuclockid(t.ident))
        except (OSError, TypeError, AttributeError):
            continue
        out[t.name] = out.get(t.name, 0.0) + sec
    return out


def _process_name() -> str:
    mp = sys.modules.get("multiprocessing")
    try:
        return mp.current_process().name if mp is not None else "MainProcess"
    except Exception:  # noqa: BLE001
        return "?"


_sampler = None


def _start() -> None:
    global _sampler
    _sampler = _Sampler()


if _DIR:
    os.makedirs(_DIR, exist_ok=True)
    _start()
    os.register_at_fork(after_in_child=_start)
    import atexit

    atexit.register(lambda: _sampler.dump())
    _os_exit = os._exit

    def _exit(code):  # exit_now and multiprocessing's children leave through os._exit
        try:
            _sampler.dump()
        finally:
            _os_exit(code)

    os._exit = _exit
