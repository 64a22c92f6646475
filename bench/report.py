"""What the benchmark scripts share: the machine they ran on, its fp32 matmul peak, and their own
section of docs/benchmarks.md, rewritten in place (the other sections are left alone)."""

from __future__ import annotations

import os
import platform
import re
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def machine(torch_version: str | None = None) -> str:
    """CPU model, cores this process may use, RAM, Python and torch versions."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch_version is None:
        import torch

        torch_version = torch.__version__
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {len(os.sched_getaffinity(0))} logical cores, {ram:.1f} GiB RAM, "
            f"Python {platform.python_version()}, torch {torch_version}")


def write_section(heading: str, section: str) -> None:
    """Replace the `## heading` section of docs/benchmarks.md with `section` (or append it)."""
    text = DOCS.read_text() if DOCS.is_file() else "# Benchmarks\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\b.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip("\n") + "\n\n", text, count=1)  # a blank line before the next
    else:
        text = text.rstrip("\n") + "\n\n" + section
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    tmp = DOCS.with_name(f".{DOCS.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, DOCS)


def matmul_peak(n: int = 1024, seconds: float = 3.0) -> float:
    """Best fp32 matmul rate (FLOP/s) over repeated n x n products at the current thread count."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        torch.matmul(a, b)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        for _ in range(5):
            torch.matmul(a, b)
        best = max(best, 5 * 2 * n**3 / (time.perf_counter() - t))
    return best
