"""Optional ``torch.compile`` of the repeated layers while :func:`~tunelab.training.loop.fit` trains.

``train.compile: true`` compiles the ``forward`` of every layer that
:func:`~tunelab.training.distributed.decoder_layers` finds (the decoder layers of a causal LM, the
encoder layers and embeddings of a BERT-style encoder: the same units FSDP shards), with
``dynamic=True`` and the default inductor backend. Choices, and why:

* **Layers, not the model or the loss.** Every layer runs the same code, so one compilation
  serves all of them (a 12-layer model compiled the same 3 frames as a 2-layer one). The chunked cross-entropy stays
  eager: it selects the supervised tokens with ``nonzero`` (a data-dependent shape) and loops over
  a data-dependent number of chunks inside a custom autograd function, which would break the graph
  anyway, and it is a few large matmuls that gain nothing from fusion. Embedding lookup, rotary
  tables and mask building also stay eager (once per forward, cheap).
* **``forward``, not ``__call__``.** The compiled function replaces ``layer.forward`` as an instance
  attribute, so module hooks (FSDP2's unshard/reshard, DDP's) stay outside the compiled code and
  the parameters keep their names: state dicts, checkpoints and saved adapters never get
  ``_orig_mod.`` prefixes.
* **Dynamic shapes.** Packed rows change length every step; ``dynamic=True`` traces the token
  dimension symbolically from the first call instead of recompiling for each new length.
* **Only during** :func:`fit`. On exit the eager ``forward`` is restored, so sample generation
  before and after training (KV cache, one token at a time) never compiles; evaluations inside
  ``fit`` run compiled (``no_grad`` compiles its own graphs once).
* **Attention.** With ``sdpa`` or ``sdpa_varlen`` attention each layer is one graph: the
  per-example split of ``sdpa_varlen`` (segment starts read from ``position_ids`` on the host,
  which the compiler cannot trace) runs inside a custom op (:mod:`tunelab.models.attention`), so
  there is no graph break and no recompile when the segment layout changes.
* **Activation checkpointing.** transformers (≥ 5) checkpoints inside ``forward``, so the
  checkpoint is traced into the compiled graph and torch's compiled activation checkpointing
  recomputes it; gradients equal the eager run (tested).

Dropout inside a compiled layer draws its masks from inductor's random number generator, not
eager torch's: with ``lora.dropout`` > 0 a compiled run is not mask-for-mask identical to an eager
one (the tests compare compiled and eager at dropout 0).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from tunelab.errors import TunelabError
from tunelab.training.distributed import decoder_layers

BACKEND = "inductor"  # module-level so a test can substitute a backend that fails


@contextmanager
def compiled_layers(model: nn.Module, enabled: bool) -> Iterator[list[nn.Module]]:
    """Inside, every layer of ``model`` runs a ``torch.compile``-d forward (when ``enabled``).

    Compilation itself is lazy: it happens on a layer's first call inside the block (and, for
    the backward graph, on the first backward), so a failure surfaces in the first training step.

    Args:
        model: the bare model (not a DDP/FSDP wrapper); its layers are found by
            :func:`~tunelab.training.distributed.decoder_layers`.
        enabled: ``train.compile``; False yields ``[]`` and changes nothing.

    Yields:
        The layers whose forward is compiled (empty when not enabled).

    Raises:
        TunelabError: ``torch.compile`` failed (no working C++ compiler for inductor on CPU, an
            operation it cannot compile, an unsupported Python): names ``train.compile`` and
            the underlying error; ``enabled`` and no layers found (from ``decoder_layers``).
    """
    if not enabled:
        yield []
        return
    layers = decoder_layers(model)
    try:
        for layer in layers:
            layer.forward = torch.compile(layer.forward, dynamic=True, backend=BACKEND)
    except RuntimeError as exc:  # torch.compile refuses at once, e.g. on a Python version dynamo does not support
        _restore(layers)
        raise _compile_error(exc) from exc
    try:
        yield layers
    except torch._dynamo.exc.TorchDynamoException as exc:  # tracing or backend failure in a step
        raise _compile_error(exc) from exc
    finally:
        _restore(layers)


def _restore(layers: list[nn.Module]) -> None:
    for layer in layers:
        layer.__dict__.pop("forward", None)  # the class's eager forward again


def _compile_error(exc: BaseException) -> TunelabError:
    """The user-facing error, naming the innermost cause (dynamo wraps the backend's exception)."""
    root = exc
    while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None:
        root = inner
    first_line = (str(root).strip().splitlines() or [""])[0][:300]
    return TunelabError(
        f"train.compile=true: torch.compile failed ({type(root).__name__}: {first_line}). On CPU, inductor needs a "
        "working C++ compiler (g++ or clang++ on PATH, or $CXX); set train.compile=false to train without compiling"
    )
