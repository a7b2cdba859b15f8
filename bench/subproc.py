"""Run one benchmark side in a fresh Python process and get its result dict back.

Why: ``ru_maxrss`` is a lifetime high-water mark and allocator/thread-pool state leaks between
runs, so every measured run gets its own interpreter. Protocol: the child redirects everything
it would print to stderr and writes exactly ONE JSON line to stdout (the result dict).

Kinds (``KINDS``): ``peer`` -> ``bench.peer.run_peer``, ``tunelab`` -> ``bench.tunelab_side.run_tunelab``
(override the latter with $TUNELAB_BENCH_SIDE="module:function", e.g. to test a stub).
Child entry point: ``python -m bench.subproc KIND '<json kwargs>'`` where kwargs include
``model_dir`` and ``data_path``.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
KINDS = {"peer": ("bench.peer", "run_peer"), "tunelab": ("bench.tunelab_side", "run_tunelab")}
SIDE_OVERRIDE_ENV = "TUNELAB_BENCH_SIDE"  # e.g. "my_pkg.my_side:run_tunelab" replaces the tunelab entry


def save_results(json_out: str | None, results: list[dict]) -> int:
    """Write ``results`` to ``json_out`` (if given, parents created); the exit code: 1 if any has an error."""
    if json_out:
        path = pathlib.Path(json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))
    return 1 if any("error" in r for r in results) else 0


def resolve(kind: str) -> tuple[str, str]:
    """(module, function) implementing ``kind``; tunelab's can be overridden via $TUNELAB_BENCH_SIDE."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}")
    override = os.environ.get(SIDE_OVERRIDE_ENV)
    if kind == "tunelab" and override:
        module, _, name = override.partition(":")
        return module, name or "run_tunelab"
    return KINDS[kind]


def _jsonable(obj):
    """Replace NaN/inf floats by None so the line is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def emit_json_result(fn, *args, **kwargs) -> None:
    """Call ``fn`` with stdout redirected to stderr, then print its dict as one JSON line on stdout."""
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        result = fn(*args, **kwargs)
    real_stdout.write(json.dumps(_jsonable(result)) + "\n")
    real_stdout.flush()


def child_env(threads: int | None) -> dict:
    """Environment for a child: repo root and src/ on PYTHONPATH, BLAS/OpenMP thread caps."""
    env = dict(os.environ)
    paths = [str(REPO_ROOT), str(REPO_ROOT / "src"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["TOKENIZERS_PARALLELISM"] = "false"
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
    return env


def run_in_subprocess(kind: str, timeout_s: float | None = None, **kwargs) -> dict:
    """Run side ``kind`` with ``kwargs`` in a fresh interpreter; return its result dict.

    Child stderr streams through to ours. On failure returns ``{"kind", "error", "returncode"}``
    instead of raising, so one broken side does not hide the others. ``wall_s`` (s) is added.
    """
    resolve(kind)
    cmd = [sys.executable, "-m", "bench.subproc", kind, json.dumps(kwargs)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=child_env(kwargs.get("threads")), stdout=subprocess.PIPE,
                              stderr=None, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"kind": kind, "error": f"timed out after {timeout_s} s", "returncode": None}
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        return {"kind": kind, "error": f"exit code {proc.returncode}", "returncode": proc.returncode, "wall_s": wall}
    try:
        result = json.loads(lines[-1])
    except json.JSONDecodeError as exc:
        return {"kind": kind, "error": f"bad JSON result line: {exc}", "returncode": proc.returncode}
    result["wall_s"] = wall
    return result


def side_available(kind: str) -> bool:
    """True if the module implementing ``kind`` can be found (without importing heavy deps)."""
    module, _ = resolve(kind)
    sys.path[:0] = [p for p in (str(REPO_ROOT), str(REPO_ROOT / "src")) if p not in sys.path]
    return importlib.util.find_spec(module) is not None


def _child_main(argv: list[str]) -> None:
    """``python -m bench.subproc KIND JSON``: import the side function and emit its result."""
    kind, kwargs = argv[0], json.loads(argv[1])
    module, name = resolve(kind)
    fn = getattr(importlib.import_module(module), name)
    model_dir, data_path = kwargs.pop("model_dir"), kwargs.pop("data_path")
    emit_json_result(fn, model_dir, data_path, **kwargs)


if __name__ == "__main__":
    _child_main(sys.argv[1:])
