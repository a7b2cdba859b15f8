"""Per-sequence log-probs of policy and reference models on ``[chosen; rejected]`` batches, and
reward-model scores: what the DPO family, reward models and PPO/GRPO feed their losses.

Batch layout (see :mod:`tunelab.data.preference`): ``S = 2B`` sequences, chosen first; padded
batches carry ``attention_mask``, packed ones ``position_ids`` + ``sequence_ids``. A padded batch
with any ``S`` (not only pairs) works for :func:`sequence_logps_of_batch`.

Public API:
  * :func:`sequence_logps_of_batch` (model, batch) → ``(seq_logps (S,), num_tokens (S,))``
  * :func:`pair_logps` (model, batch) → :class:`PairLogps` (policy, with gradients)
  * :func:`make_reference` (kind, model, ...) → a callable ``batch → PairLogps`` (no grad, eval mode):
    ``adapters_off`` (:func:`tunelab.adapters.lora.disabled`), ``frozen_copy``, or
    :class:`PrecomputedReference` (computed once, cached on disk as safetensors)
  * :func:`disable_dropout` (model): every dropout off (policy ≡ reference at step 0)
  * :func:`reward_scores` (model, batch) → ``(S,)`` scalar scores of a 1-output sequence classifier
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from tunelab.adapters.lora import disabled
from tunelab.losses.logprobs import IGNORE_INDEX, token_logps
from tunelab.models.causal_lm import model_inputs, supports_hidden_state_loss
from tunelab.models.heads import sequence_logits
from tunelab.training.distributed import Runtime, single_process


@dataclass
class PairLogps:
    """Summed reply log-probs (nats) and reply token counts of each side; all (B,)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def detach(self) -> PairLogps:
        """The same values without autograd history."""
        return PairLogps(self.chosen.detach(), self.rejected.detach(), self.chosen_tokens, self.rejected_tokens)


def sequence_logps_of_batch(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each sequence's labelled tokens, from one forward pass.

    Args:
        model: a causal LM (transformers ``*ForCausalLM``).
        batch: ``input_ids``/``labels`` (R, T) with -100 outside the replies, plus
            ``attention_mask`` (padded: sequence = row) or ``position_ids`` + ``sequence_ids``
            (packed; ``pair_index`` (B,) gives S = 2B).

    Returns:
        ``seq_logps`` (S,) float32 nats, reduction: sum over each sequence's labelled tokens;
        ``num_tokens`` (S,) int64, labelled tokens per sequence.

    With a plain linear LM head the head is applied only at labelled positions (no (R, T, V)
    logits); the math is :func:`tunelab.losses.logprobs.token_logps` either way.
    """
    labels = batch["labels"]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    if "sequence_ids" in batch:
        owner = batch["sequence_ids"][:, 1:]
        num_seqs = 2 * batch["pair_index"].numel()
    else:
        owner = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(targets)
        num_seqs = labels.shape[0]
    inputs = model_inputs(batch)
    if supports_hidden_state_loss(model):
        hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state
        head = model.get_output_embeddings()
        logits = F.linear(hidden[:, :-1][mask], head.weight, head.bias)  # (n, V), labelled positions only
        # token_logps shifts by one: feed (1, n+1, V) with a dummy last row and labels [-100, y_0..y_{n-1}].
        logits = torch.cat([logits, logits.new_zeros(1, logits.shape[-1])])[None]
        shifted = torch.cat([targets.new_full((1,), IGNORE_INDEX), targets[mask]])[None]
        picked = token_logps(logits, shifted)[0][0]
    else:
        picked = token_logps(model(**inputs, use_cache=False).logits, labels)[0][mask]
    seq_of = owner[mask]
    seq_logps = torch.zeros(num_seqs, dtype=picked.dtype, device=picked.device).index_add(0, seq_of, picked)
    return seq_logps, torch.bincount(seq_of, minlength=num_seqs)


def pair_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> PairLogps:
    """Chosen/rejected summed reply log-probs of ``model`` on a ``[chosen; rejected]`` batch (grad on)."""
    seq, num = sequence_logps_of_batch(model, batch)
    half = seq.shape[0] // 2
    return PairLogps(seq[:half], seq[half:], num[:half], num[half:])


@torch.no_grad()
def eval_pair_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> PairLogps:
    """:func:`pair_logps` in eval mode (no dropout) without gradients; restores the train flag."""
    was_training = model.training
    model.eval()
    try:
        return pair_logps(model, batch)
    finally:
        model.train(was_training)


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0: ``nn.Dropout`` modules and attention dropout attributes."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout", "attention_probs_dropout_prob",
                "hidden_dropout_prob", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)


Reference = Callable[[dict[str, torch.Tensor]], PairLogps]


def make_reference(kind: str, model: nn.Module, *, batches: Iterable[dict[str, torch.Tensor]] = (),
                   cache_path: Path | None = None, device: torch.device | None = None,
                   runtime: Runtime | None = None) -> Reference | None:
    """The reference log-prob function for strategy ``kind``.

    Args:
        kind: ``adapters_off`` (the LoRA policy with adapters disabled; no second copy),
            ``frozen_copy`` (deep copy of ``model`` as it is now, frozen), ``precomputed``
            (computed now from ``batches`` with ``model`` as it is, cached at ``cache_path``),
            or ``none`` (reference-free losses).
        batches: precomputed only: every batch the reference will be asked about, carrying
            ``pair_index``; pairs are looked up by that index afterwards.
        cache_path: precomputed only: ``.safetensors`` file; reused when its fingerprint (a hash
            of all token ids and labels) matches, else recomputed and rewritten.
        runtime: a distributed :class:`~tunelab.training.distributed.Runtime` places the reference like
            the policy: ``frozen_copy`` is sharded under FSDP (:meth:`~tunelab.training.distributed.Runtime.shard_frozen`;
            every rank must then ask for equally many batches, as training and evaluation do),
            ``precomputed`` computes each rank's share of ``batches`` and gathers the table, rank 0
            alone deciding a cache hit and writing the cache. None = one process.

    ``adapters_off`` on a model without LoRA layers is the model itself in eval mode.

    Raises:
        ValueError: unknown kind.
    """
    if kind == "none":
        return None
    if kind == "adapters_off":
        def adapters_off(batch: dict[str, torch.Tensor]) -> PairLogps:
            with disabled(model):
                return eval_pair_logps(model, batch)
        return adapters_off
    runtime = runtime or single_process(device or torch.device("cpu"))
    if kind == "frozen_copy":
        frozen = runtime.shard_frozen(copy.deepcopy(model))
        return lambda batch: frozen(eval_pair_logps, batch)
    if kind == "precomputed":
        return PrecomputedReference.build(model, list(batches), cache_path, device or torch.device("cpu"), runtime)
    raise ValueError(f"unknown reference kind {kind!r}; expected adapters_off, frozen_copy, precomputed or none")


class PrecomputedReference:
    """Reference log-probs computed once before training, looked up by ``pair_index``.

    Holds a (N, 2) float32 table ``[chosen, rejected]`` and a (N, 2) int64 token-count table.
    """

    def __init__(self, logps: torch.Tensor, tokens: torch.Tensor):
        self.logps, self.tokens = logps, tokens

    @classmethod
    def build(cls, model: nn.Module, batches: list[dict[str, torch.Tensor]], cache_path: Path | None,
              device: torch.device, runtime: Runtime | None = None) -> PrecomputedReference:
        """Compute (or load from ``cache_path``) the table for every pair in ``batches``.

        With a distributed ``runtime`` (collective) rank 0 decides whether the cache matches and
        broadcasts it; otherwise every rank computes its round-robin share of ``batches``, the rows are
        gathered (the same table on every rank) and rank 0 writes the cache.
        """
        runtime = runtime or single_process(device)
        fingerprint = _fingerprint(batches)
        cached = runtime.from_main(_read_cache, cache_path, fingerprint)
        if cached is not None:
            return cls(*cached)

        def run(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            out = eval_pair_logps(model, {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)})
            return (torch.stack([out.chosen, out.rejected], 1).float().cpu(),
                    torch.stack([out.chosen_tokens, out.rejected_tokens], 1).cpu())

        num = 1 + max(int(b["pair_index"].max()) for b in batches)
        logps, tokens = torch.zeros(num, 2), torch.zeros(num, 2, dtype=torch.long)
        for batch, (rows, counts) in zip(batches, runtime.map_shards(run, batches)):
            logps[batch["pair_index"]], tokens[batch["pair_index"]] = rows, counts
        if cache_path is not None:
            runtime.on_main(_write_cache, cache_path, logps, tokens, fingerprint)
        return cls(logps, tokens)

    def __call__(self, batch: dict[str, torch.Tensor]) -> PairLogps:
        """Reference log-probs of the pairs in ``batch`` (by ``pair_index``), on the batch's device."""
        index = batch["pair_index"].cpu()
        device = batch["input_ids"].device
        logps, tokens = self.logps[index].to(device), self.tokens[index].to(device)
        return PairLogps(logps[:, 0], logps[:, 1], tokens[:, 0], tokens[:, 1])


def _read_cache(cache_path: Path | None, fingerprint: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached ``(logps, tokens)`` tables when ``cache_path`` holds ones of this ``fingerprint``, else None."""
    if cache_path is None or not cache_path.is_file():
        return None
    cached = load_file(str(cache_path))
    if bytes(cached["fingerprint"].tolist()).hex() != fingerprint:
        return None
    return cached["logps"], cached["tokens"]


def _write_cache(cache_path: Path, logps: torch.Tensor, tokens: torch.Tensor, fingerprint: str) -> None:
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_suffix(".tmp")
    save_file({"logps": logps, "tokens": tokens,
               "fingerprint": torch.tensor(list(bytes.fromhex(fingerprint)), dtype=torch.uint8)}, str(tmp))
    tmp.replace(cache_path)


def _fingerprint(batches: list[dict[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for batch in sorted(batches, key=lambda b: b["pair_index"].tolist()):
        for key in ("pair_index", "input_ids", "labels"):
            h.update(batch[key].cpu().numpy().tobytes())
    return h.hexdigest()


def reward_scores(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Scalar scores (S,) float of a 1-output sequence classifier (reward model) on a padded batch.

    Read at the last real token (decoders) or the pooled output (encoders) by
    :func:`tunelab.models.heads.sequence_logits`, so left, right or no padding give the same score.
    """
    if "sequence_ids" in batch:
        return packed_reward_scores(model, batch)
    return sequence_logits(model, batch)[:, 0]


def packed_reward_scores(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Scores (S,) float of the S sequences packed into a (R, T) batch, in ``sequence_ids`` order.

    The decoder runs once over the packed rows with ``position_ids`` restarting per sequence and no
    ``attention_mask`` (transformers then keeps every sequence's attention inside its own segment);
    each sequence is scored at its last token, exactly where the padded path reads it, so packed and
    padded scores agree to float rounding.

    Args:
        batch: ``input_ids``, ``position_ids`` and ``sequence_ids`` (R, T) int64; ``sequence_ids``
            is -1 on padding and ``s`` on the tokens of sequence ``s`` (0..S-1, S = 2 × pairs);
            ``pair_index`` (pairs,) gives S without reading device memory.

    Raises:
        ValueError: the model is not a decoder ``*ForSequenceClassification`` (encoders cannot pack).
    """
    from tunelab.models.heads import is_decoder_classifier

    if not is_decoder_classifier(model):
        raise ValueError(f"{type(model).__name__}: packed reward batches need a decoder reward model "
                         "(a 'score' head); set data.packing: false for encoders")
    hidden = model.get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                 use_cache=False).last_hidden_state
    # Last token of each sequence without a host sync: padding (-1) goes to a spare slot S that is dropped.
    num_sequences = 2 * batch["pair_index"].numel()
    flat_ids = batch["sequence_ids"].reshape(-1)
    slots = torch.where(flat_ids >= 0, flat_ids, num_sequences)
    positions = torch.arange(flat_ids.numel(), device=flat_ids.device)
    last = torch.zeros(num_sequences + 1, dtype=torch.long, device=flat_ids.device)
    last = last.scatter_reduce(0, slots, positions, reduce="amax")[:num_sequences]
    return model.score(hidden.reshape(-1, hidden.shape[-1])[last])[:, 0]
