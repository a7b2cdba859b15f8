"""Best-fit-decreasing packing of variable-length examples into rows of bounded length.

Rows are capped at ``capacity`` tokens (normally ``max_seq_len``) because with a dense-mask
attention kernel (sdpa, eager) attention cost grows with the square of the row length: one long
row of many examples is slower than several short ones.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable


def pack_best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group example indices into rows whose summed length is at most ``capacity`` tokens.

    Best-fit decreasing (Johnson 1973): longest first, each into the fullest row it still fits.
    O(n log n) using a sorted list of remaining capacities.

    Args:
        lengths: tokens per example.
        capacity: tokens per row.

    Returns:
        Rows as lists of indices into ``lengths``, each row's examples in decreasing length.

    Raises:
        ValueError: an example is longer than ``capacity``.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining tokens, row id), sorted ascending
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than the row capacity {capacity}")
        pos = bisect.bisect_left(free, (n, -1))
        if pos < len(free):
            remaining, row_id = free.pop(pos)
            rows[row_id].append(i)
            bisect.insort(free, (remaining - n, row_id))
        else:
            rows.append([i])
            bisect.insort(free, (capacity - n, len(rows) - 1))
    return rows


def epoch_index_groups(
    lengths: list[int], *, capacity: int, batch_size: int, packing: bool, shuffle: bool, seed: int,
) -> tuple[int, Callable[[int], list[list[list[int]]]]]:
    """Which items form each micro-batch of each epoch, for any recipe's collator.

    Packed: items are packed once by :func:`pack_best_fit` into rows of at most ``capacity``
    tokens and ``batch_size`` rows form a micro-batch; epoch ``e`` shuffles (seed ``seed + e``) the
    order of rows and of items within a row. Unpacked: every row holds one item and ``batch_size``
    shuffled items form a micro-batch. Deterministic in ``e``, so a resumed run sees the same batches.

    Returns:
        ``(micro_batches_per_epoch, groups)`` where ``groups(epoch)`` lists micro-batches, each a list
        of rows, each row a list of item indices.
    """
    rows = pack_best_fit(lengths, capacity) if packing else None
    num_rows = len(rows) if packing else len(lengths)

    def groups(epoch: int) -> list[list[list[int]]]:
        rng = random.Random(seed + epoch)
        if packing:
            epoch_rows = [list(row) for row in rows]
            if shuffle:
                rng.shuffle(epoch_rows)
                for row in epoch_rows:
                    rng.shuffle(row)
        else:
            order = list(range(len(lengths)))
            if shuffle:
                rng.shuffle(order)
            epoch_rows = [[i] for i in order]
        return [epoch_rows[i : i + batch_size] for i in range(0, len(epoch_rows), batch_size)]

    return -(-num_rows // batch_size), groups
