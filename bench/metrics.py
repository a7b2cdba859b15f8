"""Shared measurement helpers so every side (peer, tunelab) computes rates the same way.

Rate convention: step 1 is warm-up (allocator growth, first-call dispatch, lazy init) and is
EXCLUDED from s/step and tok/s; rates are ``sum(tokens[1:]) / sum(seconds[1:])``. With a single
step there is nothing left, so step 1 is used and ``warmup_steps_excluded`` says 0.
"""
from __future__ import annotations

import hashlib
import json
import resource
import sys

GIB = 1024 ** 3


def rss_bytes() -> int:
    """Current resident set size of this process, in bytes (psutil)."""
    import psutil

    return psutil.Process().memory_info().rss


def ru_maxrss_bytes() -> int:
    """Lifetime high-water RSS of this process, in bytes (getrusage; KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def fingerprint(obj) -> str:
    """Short sha1 of a JSON-serialisable object (e.g. the list of per-step example ids)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def summarize_steps(step_times_s: list[float], real_tokens: list[int], supervised_tokens: list[int],
                    losses: list[float], warmup_steps: int = 1) -> dict:
    """Aggregate per-step measurements.

    Args: per-step wall seconds, non-pad tokens, supervised (label != -100) tokens, loss.
    Returns: s_per_step (s), real_tok_s and supervised_tok_s (tokens/s), final_loss, and
    ``warmup_steps_excluded`` (steps dropped from the front before computing rates).
    """
    n = len(step_times_s)
    if not (n == len(real_tokens) == len(supervised_tokens)):
        raise ValueError("per-step lists have different lengths")
    skip = warmup_steps if n > warmup_steps else 0
    secs = sum(step_times_s[skip:])
    return {
        "warmup_steps_excluded": skip,
        "measured_steps": n - skip,
        "s_per_step": secs / max(1, n - skip),
        "real_tok_s": sum(real_tokens[skip:]) / secs if secs else float("nan"),
        "supervised_tok_s": sum(supervised_tokens[skip:]) / secs if secs else float("nan"),
        "first_step_s": step_times_s[0] if n else float("nan"),
        "final_loss": losses[-1] if losses else float("nan"),
    }


def cpu_snapshot() -> tuple[float, float, float]:
    """(wall s, this process's CPU s, whole-machine busy CPU s) for contention accounting."""
    import time

    import psutil

    own = psutil.Process().cpu_times()
    sys_t = psutil.cpu_times()
    busy = sum(sys_t) - sys_t.idle - getattr(sys_t, "iowait", 0.0)
    return time.perf_counter(), own.user + own.system, busy


def cpu_cores_between(a: tuple[float, float, float], b: tuple[float, float, float]) -> tuple[float, float]:
    """(cores used by this process, cores used by OTHER processes) between two ``cpu_snapshot``s.

    ``other`` > ~0.2 on a 2-core box means another workload was competing and the timing is noisy.
    Children of this process (none in our runs) would count as "other".
    """
    dt = max(b[0] - a[0], 1e-9)
    own = (b[1] - a[1]) / dt
    return own, max(0.0, (b[2] - a[2]) / dt - own)
