"""Plan the micro-batches of an epoch: shuffle, pack (or group) and collate, deterministically."""

from __future__ import annotations

import random

from tunelab.data.collate import num_supervised_tokens, pad_collate, packed_collate
from tunelab.data.packing import pack_best_fit
from tunelab.data.tokenize import TokenizedExample
from tunelab.training.loop import Batch, BatchPlan


def sft_batch_plan(
    examples: list[TokenizedExample], *, batch_size: int, max_seq_len: int, packing: bool, shuffle: bool,
    seed: int, pad_token_id: int,
) -> BatchPlan:
    """Micro-batches for causal-LM training.

    With ``packing``, examples are packed best-fit-decreasing into rows of at most
    ``max_seq_len`` tokens and ``batch_size`` rows form a micro-batch; otherwise
    ``batch_size`` examples are right-padded together. Epoch ``e`` is shuffled with seed
    ``seed + e`` (packed: the order of rows and of examples within a row; the rows themselves are
    fixed by length), so the plan is reproducible for resume.
    """
    pairs = [(e.input_ids, e.labels) for e in examples]
    if packing:
        rows = pack_best_fit([len(ids) for ids, _ in pairs], max_seq_len)
        num_micro = -(-len(rows) // batch_size)
    else:
        num_micro = -(-len(pairs) // batch_size)

    def make_epoch(epoch: int) -> list[Batch]:
        rng = random.Random(seed + epoch)
        if packing:
            epoch_rows = [list(row) for row in rows]
            if shuffle:
                rng.shuffle(epoch_rows)
                for row in epoch_rows:
                    rng.shuffle(row)
            groups = [epoch_rows[i : i + batch_size] for i in range(0, len(epoch_rows), batch_size)]
            return [_finish(packed_collate([[pairs[i] for i in row] for row in g], pad_token_id),
                            sum(len(pairs[i][0]) for row in g for i in row)) for g in groups]
        order = list(range(len(pairs)))
        if shuffle:
            rng.shuffle(order)
        groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        return [_finish(pad_collate([pairs[i] for i in g], pad_token_id), sum(len(pairs[i][0]) for i in g))
                for g in groups]

    return BatchPlan(micro_batches_per_epoch=num_micro, make_epoch=make_epoch)


def _finish(batch: Batch, num_tokens: int) -> Batch:
    batch["num_tokens"] = num_tokens
    batch["num_supervised"] = num_supervised_tokens(batch["labels"])
    return batch
