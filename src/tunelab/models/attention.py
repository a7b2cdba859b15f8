"""``sdpa_varlen``: exact attention for packed rows without the dense block-diagonal mask.

A packed row holds several examples back to back, each with ``position_ids`` restarting at 0.
transformers' ``sdpa`` attention turns that into a dense (T × T) boolean mask and runs one
scaled-dot-product attention over the whole row: the kernel computes every block, including the
cross-example blocks the mask then throws away, and a masked call cannot use the causal kernel's
skipping of the upper triangle. ``sdpa_varlen`` splits each row at its segment starts and runs one
``is_causal`` attention per example instead, so the work is Σ lᵢ²/2 rather than T² (a 512-token
row of three examples: ~6× less attention arithmetic). Measured on SmolLM2-135M + LoRA, fp32,
2 CPU threads (``python -m bench.cpu_ab``): on rows of ≤ 512 tokens this is no faster than masked
``sdpa`` (0.96–1.10×); what it buys is that
a micro-batch's rows can be concatenated into one long row at linear attention cost
(``sft_batch_plan(flatten_rows=True)``: 0.98–1.25× over running the rows one by one).

The result is the same attention (each token sees exactly the earlier tokens of its own example),
so packed ≡ unpacked holds as for ``sdpa`` (tested in ``tests/invariants/test_packing.py``).
Inputs the segment path does not cover fall back to transformers' own ``sdpa`` forward: a padding
mask (``attention_mask`` given), a KV cache (query shorter than key), bidirectional encoders
(``module.is_causal`` false), or no ``position_ids``.

Segment starts are read from ``position_ids`` with one small host copy per layer; that is free on
CPU but a device sync per layer on CUDA, where ``auto`` therefore picks ``sdpa`` (and
``flash_attention_2`` is the varlen kernel to use).
Under ``torch.compile`` (``train.compile``) the host-side split cannot be traced, so the compiled
path calls the custom op ``tunelab::segment_attention`` instead, opaque to the compiler (no graph
break, also inside a checkpointed layer); its backward recomputes the per-example attention
(one extra attention forward per layer) and it refuses attention dropout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NAME = "sdpa_varlen"
# Attention implementations that take example boundaries from position_ids with no dense mask, so a
# micro-batch's packed rows can be concatenated into one row at linear attention cost.
VARLEN_ATTENTION = frozenset({NAME, "flash_attention_2"})


def segment_bounds(position_ids: torch.Tensor) -> list[int]:
    """Segment boundaries of one packed row: ``[0, s1, s2, ..., T]`` where position_ids restart at 0.

    Args:
        position_ids: (T,) int64, restarting at 0 at each example's first token.

    Returns:
        Sorted token offsets, first 0 and last T; consecutive pairs delimit one example.
    """
    length = int(position_ids.shape[0])
    starts = torch.nonzero(position_ids == 0).flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    return [*starts, length]


def segment_causal_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention run separately on every example of every packed row.

    Signature of a transformers attention function (``AttentionInterface``).

    Args:
        module: the attention module (``is_causal`` is read from it).
        query: (B, H, T, D) queries.
        key, value: (B, H_kv, S, D); H_kv may divide H (grouped-query attention).
        attention_mask: None for packed/unpadded input; otherwise a transformers sdpa mask, and the
            call falls back to transformers' ``sdpa_attention_forward``.
        dropout: attention dropout probability (0 in eval).
        scaling: softmax scale (default 1/sqrt(D)).
        **kwargs: must carry ``position_ids`` (B, T) or (1, T) for the segment path.

    Returns:
        ((B, T, H, D) attention output, None) — the layout transformers' attention functions return.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    batch, heads, length, _ = query.shape
    if (attention_mask is not None or position_ids is None or key.shape[2] != length
            or not getattr(module, "is_causal", True)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    gqa = key.shape[1] != heads
    if torch.compiler.is_compiling():  # train.compile: one opaque op, so the layer stays one graph
        if dropout:
            raise ValueError(f"{NAME} under torch.compile (train.compile) needs attention dropout 0, got {dropout}; "
                             "set model.attn_implementation: sdpa or train.compile: false")
        return torch.ops.tunelab.segment_attention(query, key, value, position_ids, scaling, gqa), None
    return _segment_attention(query, key, value, position_ids, dropout, scaling, gqa), None


def _segment_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, position_ids: torch.Tensor,
                       dropout: float, scaling: float | None, gqa: bool) -> torch.Tensor:
    """Per-example causal attention of packed rows; shapes as in :func:`segment_causal_attention`,
    returns the (B, T, H, D) contiguous output."""
    batch = query.shape[0]
    position_ids = position_ids.expand(batch, -1)
    if batch > 1 and not bool((position_ids[:, 1:] == 0).any()):  # nothing packed: one batched causal call
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True, scale=scaling,
                                             enable_gqa=gqa)
        return out.transpose(1, 2).contiguous()
    rows = []
    for b in range(batch):
        bounds = segment_bounds(position_ids[b])
        parts = [
            F.scaled_dot_product_attention(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                           dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
            for s, e in zip(bounds[:-1], bounds[1:])
        ]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    out = rows[0] if batch == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous()


# Under torch.compile the per-example split (segment starts read on the host) cannot be traced, and a graph
# break inside a checkpointed layer would leave the whole layer uncompiled. So the compiled path calls these two
# custom ops instead: opaque to the compiler, with fake (shape-only) versions for tracing. The backward
# recomputes the attention of each example (no attention probabilities are kept), so it costs one more
# attention forward than eager autograd; dropout is not supported there (a recompute would draw new masks).
@torch.library.custom_op("tunelab::segment_attention", mutates_args=())
def _segment_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, position_ids: torch.Tensor,
                          scaling: float | None, gqa: bool) -> torch.Tensor:
    return _segment_attention(query, key, value, position_ids, 0.0, scaling, gqa)


@_segment_attention_op.register_fake
def _(query, key, value, position_ids, scaling, gqa):
    batch, heads, length, dim = query.shape
    return query.new_empty(batch, length, heads, dim)


@torch.library.custom_op("tunelab::segment_attention_backward", mutates_args=())
def _segment_attention_backward_op(
    grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, position_ids: torch.Tensor,
    scaling: float | None, gqa: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Custom ops run below autograd; torch.func.vjp differentiates with its own transform level.
    _, vjp = torch.func.vjp(lambda q, k, v: _segment_attention(q, k, v, position_ids, 0.0, scaling, gqa),
                            query, key, value)
    return tuple(g.contiguous() for g in vjp(grad_out))


@_segment_attention_backward_op.register_fake
def _(grad_out, query, key, value, position_ids, scaling, gqa):
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


def _setup_backward(ctx, inputs, output) -> None:
    query, key, value, position_ids, scaling, gqa = inputs
    ctx.save_for_backward(query, key, value, position_ids)
    ctx.scaling, ctx.gqa = scaling, gqa


def _backward(ctx, grad_out):
    query, key, value, position_ids = ctx.saved_tensors
    grads = torch.ops.tunelab.segment_attention_backward(grad_out, query, key, value, position_ids, ctx.scaling,
                                                         ctx.gqa)
    return *grads, None, None, None


_segment_attention_op.register_autograd(_backward, setup_context=_setup_backward)


def _segment_mask(*args, **kwargs) -> torch.Tensor | None:
    """Mask builder for ``sdpa_varlen``: none when there is no padding mask (segments come from
    ``position_ids``), else transformers' sdpa mask, which the attention falls back to."""
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register ``sdpa_varlen`` with transformers (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(NAME, segment_causal_attention)
    AttentionMaskInterface.register(NAME, _segment_mask)


def resolve_attn_implementation(name: str) -> str:
    """``auto`` → ``sdpa_varlen`` without CUDA (measured faster on CPU), ``sdpa`` with CUDA; others as given."""
    if name == "auto":
        name = "sdpa" if torch.cuda.is_available() else NAME
    if name == NAME:
        register()
    return name
