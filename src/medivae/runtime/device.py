"""Device and precision choice: CUDA when present, then MPS, then CPU; bf16 only where native."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import re
import time
from pathlib import Path

import torch

from medivae.runtime.errors import UserError

DEVICE_NAMES = re.compile(r"auto|cpu|mps|cuda(:\d{1,3})?")


def check_device_name(pref) -> str:
    """``pref`` if it is auto, cpu, cuda, cuda:N or mps (whether the device exists is :func:`pick_device`'s to say);
    checked where a command reads its flags, before any work."""
    if not isinstance(pref, str) or not DEVICE_NAMES.fullmatch(pref):
        raise UserError(f"unknown device {pref!r}; use auto, cpu, cuda, cuda:N or mps")
    return pref


def pick_device(pref: str = "auto") -> torch.device:
    check_device_name(pref)
    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(pref)
    except RuntimeError:
        raise UserError(f"unknown device {pref!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but CUDA is not available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device {pref!r}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 ...)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("device 'mps' requested but MPS is not available; use --device cpu")
    return dev


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True on CPUs with AVX-512 BF16 or AMX (checked at run time), where bf16 matmuls are fast."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and "avx512" in flags
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: plain fp32)."""
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise UserError("fp16 needs a CUDA device; use --precision bf16 or fp32 on CPU")
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def full_precision(device_type: str):
    """A region that computes in the tensors' own dtype even inside an autocast region (for math that bf16
    breaks: variances as differences of means, distances to pick a code, an optimisation on the image).
    Only CPU and CUDA have autocast to turn off here: torch < 2.5 refuses ``torch.autocast("mps", ...)``
    even with enabled=False, and never autocasts there (medivae's own autocast is CPU / CUDA only)."""
    if device_type in ("cpu", "cuda"):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _cpu_snapshot() -> tuple[float, float, float]:
    """(idle + iowait ticks of the machine, all its ticks, this process's own CPU seconds)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    own = os.times()
    return ticks[3] + ticks[4], sum(ticks), own.user + own.system


_probe_start: tuple[float, float, float, float] | None = None  # (wall clock, *_cpu_snapshot())


def start_idle_probe() -> None:
    """Start measuring the cores other processes leave idle, so that ``idle_cores`` can use the time a run
    spends loading data instead of sleeping for it (a short run's start-up)."""
    global _probe_start
    try:
        _probe_start = (time.monotonic(), *_cpu_snapshot())
    except (OSError, ValueError, IndexError):
        _probe_start = None


def idle_cores(interval: float = 0.3) -> float | None:
    """CPU cores that other processes leave idle (/proc/stat; None without it), over at least ``interval``
    seconds since :func:`start_idle_probe` (sleeping for what is missing). This process's own CPU time
    counts as idle, since it is what the measurement is for: our own data loading must not look like load."""
    start = _probe_start
    try:
        if start is None:
            start = (time.monotonic(), *_cpu_snapshot())
        time.sleep(max(0.0, interval - (time.monotonic() - start[0])))
        idle1, all1, own1 = _cpu_snapshot()
    except (OSError, ValueError, IndexError):
        return None
    _, idle0, all0, own0 = start
    ticks = max(all1 - all0, 1)
    own_ticks = (own1 - own0) * os.sysconf("SC_CLK_TCK")
    return min(float(os.cpu_count() or 1), (os.cpu_count() or 1) * (idle1 - idle0 + own_ticks) / ticks)


@functools.lru_cache(maxsize=1)
def auto_threads() -> int | None:
    """The cores idle when first asked (at least 1, at most the usable ones); None without /proc.
    Decided once per process, so repeated trainings in one session do not each wait to measure."""
    idle = idle_cores()
    if idle is None:
        return None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(usable, round(idle)))


def configure_threads(requested: int, device: torch.device) -> int:
    """Set torch's intra-op threads for training and return them: ``requested`` when > 0; otherwise, on
    CPU with OMP_NUM_THREADS unset, the idle cores (``auto_threads``); torch's default elsewhere.

    Why: the bf16 oneDNN kernels synchronise their threads hundreds of times per step. When another
    process holds one of the cores, each barrier waits for a descheduled thread: on a busy 2-core node
    a training step ran ~40x slower with 2 threads than with 1. On an idle machine this
    keeps torch's default (all cores)."""
    if requested > 0:
        torch.set_num_threads(requested)
    elif device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS") and auto_threads():
        torch.set_num_threads(auto_threads())
    return torch.get_num_threads()


def preload_in_background(*modules: str) -> None:
    """Import ``modules`` on a daemon thread while the caller goes on (e.g. loads data).

    Why: building the first optimizer imports torch._dynamo (torch's ``add_param_group`` is wrapped in
    ``torch._disable_dynamo``), about 1 s, on a short run's critical path. Python's import lock
    makes a later import of the same module wait for this one instead of importing it twice. Only modules
    needed before training starts belong here: preloading matplotlib for the report ran on into the first
    epoch and cost ~15 % of its images/s (GIL contention; paired runs, benchmarks/README.md)."""
    import importlib
    import threading

    def load():
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001  (a failed preload only means the import happens later)
                pass

    threading.Thread(target=load, name="medivae-preload", daemon=True).start()


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse instead of returning it to the OS (once per process;
    True if applied, False on other C libraries). The process then holds its peak memory until it exits.

    Why: a CPU training step frees and re-allocates the same megabyte-sized activations. By default glibc
    unmaps or trims them and the next step page-faults them back in, zero-filled. Worth +1 to +10 % of
    training images/s on 2 cores in two runs of benchmarks/speed_ablation.py (benchmarks/README.md)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def one_thread():
    """One torch (and BLAS/OpenMP) thread inside the block, the caller's count restored after. Small matrices
    gain nothing from threads, and on a busy machine threads cost 10-20x (measured:
    RealNVP on 5,000 x 32 latents, 200 s with torch's default threads vs 11 s with one, load 9 on 2 cores)."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(before)
