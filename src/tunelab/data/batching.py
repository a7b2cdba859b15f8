"""Plan the micro-batches of an epoch: shuffle, pack (or group) and collate, deterministically."""

from __future__ import annotations

from tunelab.data.collate import num_supervised_tokens, pad_collate, packed_collate
from tunelab.data.packing import epoch_index_groups
from tunelab.data.tokenize import TokenizedExample
from tunelab.training.loop import Batch, BatchPlan


def sft_batch_plan(
    examples: list[TokenizedExample], *, batch_size: int, max_seq_len: int, packing: bool, shuffle: bool,
    seed: int, pad_token_id: int, flatten_rows: bool = False,
) -> BatchPlan:
    """Micro-batches for causal-LM training.

    With ``packing``, examples are packed best-fit-decreasing into rows of at most
    ``max_seq_len`` tokens and ``batch_size`` rows form a micro-batch; otherwise
    ``batch_size`` examples are right-padded together. Epoch ``e`` is shuffled with seed
    ``seed + e`` (packed: the order of rows and of examples within a row; the rows themselves are
    fixed by length), so the plan is reproducible for resume.

    ``flatten_rows`` (packing only) concatenates a micro-batch's rows into one row of up to
    ``batch_size × max_seq_len`` tokens: no padding between rows and larger matrix multiplies. Only
    for an attention that reads example boundaries from ``position_ids`` without a dense mask
    (``sdpa_varlen``, ``flash_attention_2``); with a dense mask the attention cost would grow with
    the square of the whole row.
    """
    pairs = [(e.input_ids, e.labels) for e in examples]
    num_micro, groups = epoch_index_groups([len(ids) for ids, _ in pairs], capacity=max_seq_len,
                                           batch_size=batch_size, packing=packing, shuffle=shuffle, seed=seed)

    def make_epoch(epoch: int) -> list[Batch]:
        batches = []
        for g in groups(epoch):
            rows = [[pairs[i] for i in row] for row in g]
            if packing and flatten_rows:
                rows = [[example for row in rows for example in row]]
            batch = packed_collate(rows, pad_token_id) if packing else pad_collate([r[0] for r in rows], pad_token_id)
            batches.append(_finish(batch, sum(len(ids) for row in rows for ids, _ in row)))
        return batches

    return BatchPlan(micro_batches_per_epoch=num_micro, make_epoch=make_epoch)


def _finish(batch: Batch, num_tokens: int) -> Batch:
    batch["num_tokens"] = num_tokens
    batch["num_supervised"] = num_supervised_tokens(batch["labels"])
    return batch
