"""The trainer's memory: a limit a margin under the machine's, its peak, and "out of memory" said plainly.

The limit. The trainer caps itself at `STUDIO_TRAINER_MEMORY_LIMIT_BYTES` (a whole number of
bytes; `off` for none), by default the RAM available when it starts (within its cgroup's limit,
when that is lower; shared evenly by the processes of a DDP run) plus what it already holds, less
a margin (MARGIN_BYTES or MARGIN_SHARE of the RAM, the larger), so an oversized run fails alone instead of the kernel's OOM killer
choosing among the trainer, the UI server and everything else. What was measured here (Linux
6.18, 2-core CPU, 23 GB, no GPU) decided how:

- RLIMIT_AS is unusable: importing torch + transformers + peft maps 2.2 GB of address space
  for 0.5 GB resident, and CUDA reserves far more; a limit on it fails runs that fit.
- cgroup v2 memory.max needs a delegated cgroup (a `systemd-run --user --scope` or a container
  set up for it); here the memory controller is on cgroup v1 only and there is no user systemd,
  so the trainer cannot get one. When the trainer already runs under a cgroup limit, the room
  left under it caps the default.
- RLIMIT_DATA works: it counts private writable mappings (heap, anonymous mmap), which is where
  torch's CPU allocator puts tensors. Past it an allocation fails inside the process: torch
  raises `RuntimeError: ... DefaultCPUAllocator: can't allocate memory` and Python MemoryError,
  both caught and reported; the process is not killed. After the imports VmData exceeds the
  resident set by about 1 GB (mapped, never touched), so the limit is set to VmData plus the
  room left (limit - resident), measured at start and again when training begins.
  On a CUDA machine the host limit is not set (the driver's mappings were not measured);
  torch.cuda.OutOfMemoryError reports the GPU's side.
- The trainer raises its own /proc/self/oom_score_adj to 1000, so should the kernel's OOM killer
  still act (memory taken by other processes), it picks the trainer first, not the UI.

Reporting. A trainer ended by an out-of-memory error (MemoryError, torch.OutOfMemoryError,
torch's allocator failing, the limit above) or killed for memory (SIGKILL with the kernel's
"Killed process PID" line in /dev/kmsg, or its cgroup's oom_kill count risen) is `failed` with
"out of memory at step N (peak X GB): what happened. Any of these would fit: ..." -- N is the
optimizer step that was being computed (0: before training began), the peak is the trainer's
resident peak (VmHWM), and the suggestions are preflight's, computed when the trainer starts
(status.json `memory`), so a reader can say them after a SIGKILL too.

Peak memory. peak_rss_mb (VmHWM, the kernel's high-water mark of the resident set) and, on a GPU,
peak_gpu_mb (torch.cuda.max_memory_allocated) are the peaks since the trainer started; they go
into every training row of metrics.jsonl and into status.json.

Nothing at module level imports torch: RunDir.status() asks killed_for_memory() about dead runs.
"""

from __future__ import annotations

import os
import re
import resource
import threading
import time
from pathlib import Path

import psutil

from studio.errors import ConfigError

LIMIT_ENV = "STUDIO_TRAINER_MEMORY_LIMIT_BYTES"
MARGIN_BYTES, MARGIN_SHARE = 512 * 2**20, 0.05
# What the allocators say when an allocation fails (torch CPU and CUDA, glibc through torch, bitsandbytes).
OOM_TEXT = re.compile(r"out of memory|can't allocate memory|cannot allocate memory|failed to allocate", re.I)
KMSG = Path("/dev/kmsg")
KILLED = re.compile(r"(?:Out of memory|Memory cgroup out of memory|oom[-_ ]kill).*?Killed process (\d+) \(([^)]*)\)", re.I)
MB = 2**20


# --- sizes --------------------------------------------------------------------------------------

def gb(n: float) -> str:
    return f"{n / 2**30:.2f} GB"


def _proc_status(field: str) -> int | None:
    """A `kB` field of /proc/self/status in bytes (VmRSS, VmHWM, VmData), None off Linux."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) * 1024 if m else None


def peak_rss_bytes() -> int:
    """The trainer's resident peak since it started (the kernel's high-water mark)."""
    hwm = _proc_status("VmHWM")
    if hwm is not None:
        return hwm
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if os.uname().sysname == "Darwin" else r * 1024  # macOS counts bytes, Linux kB


def peak_gpu_bytes() -> int | None:
    """torch.cuda.max_memory_allocated on the current GPU, None without CUDA in use."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.max_memory_allocated())


def peaks() -> dict:
    """{"peak_rss_mb": x, "peak_gpu_mb": y (on a GPU)}: metrics.jsonl's and status.json's keys."""
    out = {"peak_rss_mb": round(peak_rss_bytes() / MB, 1)}
    g = peak_gpu_bytes()
    if g is not None:
        out["peak_gpu_mb"] = round(g / MB, 1)
    return out


# --- cgroups ------------------------------------------------------------------------------------

def cgroup_files() -> dict[str, Path]:
    """This process's memory cgroup files that exist: limit, usage and events (v2 or v1)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            d = Path("/sys/fs/cgroup") / path.lstrip("/")
            names = {"limit": "memory.max", "usage": "memory.current", "events": "memory.events"}
        elif "memory" in controllers.split(","):
            d = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            names = {"limit": "memory.limit_in_bytes", "usage": "memory.usage_in_bytes",
                     "events": "memory.oom_control"}
        else:
            continue
        found = {k: d / n for k, n in names.items() if (d / n).is_file()}
        if "limit" in found:
            return found
    return {}


def cgroup_room() -> int | None:
    """Bytes left under this process's cgroup memory limit, None without a limit."""
    f = cgroup_files()
    try:
        raw = f["limit"].read_text().strip()
        limit = None if raw == "max" else int(raw)
        if limit is None or limit >= 2**60:  # v1 writes "no limit" as a page-rounded 2^63
            return None
        return max(0, limit - int(f["usage"].read_text()))
    except (KeyError, OSError, ValueError):
        return None


def cgroup_oom_kills() -> tuple[str, int] | None:
    """(events file, its oom_kill count) of this process's memory cgroup, when it has one."""
    f = cgroup_files().get("events")
    try:
        m = re.search(r"^oom_kill (\d+)", f.read_text(), re.M) if f else None
    except OSError:
        return None
    return (str(f), int(m.group(1))) if m else None


# --- the limit ----------------------------------------------------------------------------------

def resolve_limit(environ=None) -> tuple[int | None, str]:
    """(bytes, where they come from) the trainer may hold; (None, why) for no limit."""
    environ = os.environ if environ is None else environ
    raw = environ.get(LIMIT_ENV, "").strip()
    if raw.lower() == "off":
        return None, f"{LIMIT_ENV}=off"
    if raw:
        try:
            n = int(raw)
            if n < 1:
                raise ValueError
        except ValueError:
            raise ConfigError(f"{LIMIT_ENV}={raw!r}: give the trainer's memory limit as a whole number of bytes, "
                              "e.g. 8000000000, or off; unset, it is the RAM available less a margin") from None
        return n, LIMIT_ENV
    vm = psutil.virtual_memory()
    room, where = vm.available, "RAM available"
    cg = cgroup_room()
    if cg is not None and cg < room:
        room, where = cg, "room under the cgroup's limit"
    margin = max(MARGIN_BYTES, int(MARGIN_SHARE * vm.total))
    held = _proc_status("VmRSS") or 0
    # Processes of one DDP run start together and each sees the same room: they share it.
    local = max(1, int(environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    share = f", shared by {local} processes" if local > 1 else ""
    return max(held + (room - margin) // local, held + MB), f"{where} at start less a {gb(margin)} margin{share}"


class Guard:
    """The trainer's memory limit (RLIMIT_DATA on CPU), its peak, and the words for running out."""

    def __init__(self, limit: int | None, source: str, cuda: bool = False):
        self.limit, self.source, self.cuda = limit, source, cuda
        self.mechanism = "none"
        self._lock = threading.Lock()

    @classmethod
    def start(cls, cuda: bool = False, environ=None) -> Guard:
        """Resolve the limit and apply it; a ConfigError names a bad STUDIO_TRAINER_MEMORY_LIMIT_BYTES."""
        limit, source = resolve_limit(environ)
        g = cls(limit, source, cuda)
        _raise_oom_score()
        g.apply()
        return g

    def apply(self) -> None:
        """(Re)set RLIMIT_DATA to the current data size plus the room left under the limit."""
        if self.limit is None or self.cuda or not hasattr(resource, "RLIMIT_DATA"):
            self.mechanism = "none" if self.limit is None else "not enforced on the host with CUDA"
            return
        data, rss = _proc_status("VmData"), _proc_status("VmRSS")
        if data is None or rss is None:
            self.mechanism = "not enforced (no /proc)"
            return
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        soft = data + max(self.limit - rss, MB)
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        with self._lock:
            resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
        self.mechanism = "RLIMIT_DATA"

    def release(self) -> None:
        """Lift the limit, so reporting a failure has the memory it needs."""
        if self.mechanism == "RLIMIT_DATA":
            with self._lock:
                _, hard = resource.getrlimit(resource.RLIMIT_DATA)
                resource.setrlimit(resource.RLIMIT_DATA, (hard, hard))

    def describe(self) -> dict:
        """status.json `memory`'s own part: the limit, where it comes from, how it is kept."""
        return {"limit_bytes": self.limit, "limit_source": self.source, "mechanism": self.mechanism}


def _raise_oom_score() -> None:
    try:  # any process may make itself the OOM killer's first choice (lowering needs privileges)
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass


# --- saying it ----------------------------------------------------------------------------------

def is_oom(exc: BaseException | None) -> bool:
    """Whether an exception (or one it was raised from) is an allocation that failed."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
            return True
        if isinstance(exc, RuntimeError) and OOM_TEXT.search(str(exc)):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def oom_message(step: int, peak_rss: int, what: str, memory: dict | None, peak_gpu: int | None = None) -> str:
    """One line: "out of memory at step N (peak X GB): what. Any of these would fit: ..."."""
    peak = f"peak {gb(peak_rss)}" + (f", GPU peak {gb(peak_gpu)}" if peak_gpu is not None else "")
    advice = (memory or {}).get("advice")
    return f"out of memory at step {step} ({peak}): {what}" + (f". {advice}" if advice else "")


def failure_detail(exc: BaseException, memory: dict | None) -> str:
    """What ran out, from the exception and the limit in force."""
    text = " ".join(str(exc).split())
    m = re.search(r"tried to allocate (\d+) bytes", text)
    asked = f"an allocation of {int(m.group(1)) / MB:,.1f} MB failed" if m else f"{type(exc).__name__}: {text[:200]}"
    if type(exc).__name__ == "OutOfMemoryError":
        return f"the GPU ran out: {text[:300]}"
    memory = memory or {}
    if memory.get("limit_bytes") and memory.get("mechanism") == "RLIMIT_DATA":
        return f"{asked} under the trainer's memory limit of {gb(memory['limit_bytes'])} ({memory.get('limit_source')})"
    return asked


def failure_message(status: dict, exc: BaseException) -> str:
    """The run's error for an allocation that failed in this process: the step in progress (from
    the trainer's status), the peak, what ran out, the advice."""
    step = int(status.get("step") or 0) + (1 if status.get("phase") == "training" else 0)
    memory = status.get("memory")
    return oom_message(step, peak_rss_bytes(), failure_detail(exc, memory), memory, peak_gpu_bytes())


_kmsg_lock = threading.Lock()
_kmsg_seen: dict[tuple, str | None] = {}


def kernel_killed(pid: int, since: float | None = None) -> str | None:
    """The kernel log's line saying the OOM killer ended `pid` (after unix time `since`, so a reused
    pid is not mistaken for it), or None, also when the log cannot be read."""
    key = (pid, since)
    with _kmsg_lock:
        if key in _kmsg_seen:
            return _kmsg_seen[key]
    # Kernel log times are seconds of the monotonic clock (as time.monotonic, no suspend in them):
    # a kill no older than the run's wall time since `since` is this run's.
    found, now, mono = None, time.time(), time.monotonic()
    try:
        fd = os.open(KMSG, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None  # unprivileged on most desktops (dmesg_restrict): the cgroup's count may still say
    try:
        while True:
            try:
                rec = os.read(fd, 8192).decode("utf-8", "replace")
            except BlockingIOError:
                break
            except OSError:  # EPIPE: records overwritten while reading; keep going
                continue
            if not rec:
                break
            m = KILLED.search(rec)
            if m and int(m.group(1)) == pid:
                head, _, text = rec.partition(";")
                fields = head.split(",")  # priority, sequence, microseconds since boot, flags
                age = mono - int(fields[2]) / 1e6 if len(fields) > 2 and fields[2].isdigit() else None
                if since is None or age is None or age <= now - since + 5:
                    found = text.strip().splitlines()[0]
    finally:
        os.close(fd)
    with _kmsg_lock:
        if len(_kmsg_seen) > 256:
            _kmsg_seen.clear()
        _kmsg_seen[key] = found
    return found


def killed_for_memory(status: dict) -> str | None:
    """For a trainer that died without a final state: the out-of-memory line, when there is evidence."""
    pid, memory = status.get("pid"), status.get("memory") or {}
    evidence = None
    line = kernel_killed(int(pid), status.get("started_at")) if pid else None
    if line:
        evidence = f"the kernel's OOM killer ended the trainer (kernel log: {line})"
    else:
        before = memory.get("cgroup_oom_kill")
        path = memory.get("cgroup_events")
        if before is not None and path:
            try:
                m = re.search(r"^oom_kill (\d+)", Path(path).read_text(), re.M)
            except OSError:
                m = None
            if m and int(m.group(1)) > before:
                evidence = (f"its cgroup's OOM killer ended the trainer (oom_kill {before} -> {m.group(1)} in {path})")
    if evidence is None:
        return None
    step = int(status.get("step") or 0) + (1 if status.get("phase") == "training" else 0)
    return oom_message(step, int((status.get("peak_rss_mb") or 0) * MB), evidence, memory,
                       int(status["peak_gpu_mb"] * MB) if status.get("peak_gpu_mb") else None)
