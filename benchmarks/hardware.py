"""What the benchmarks report about the machine they ran on."""
from __future__ import annotations

import platform


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo; else what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
