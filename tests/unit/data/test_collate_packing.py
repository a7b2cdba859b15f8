import torch

from tunelab.data.collate import num_supervised_tokens, pad_collate, packed_collate
from tunelab.data.packing import pack_best_fit


def test_best_fit_decreasing_respects_capacity_and_places_everything():
    lengths = [5, 9, 3, 7, 2, 8, 1]
    rows = pack_best_fit(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 4  # 9+1, 8+2, 7+3, 5 — total 35 needs at least 4 rows of 10


def test_packed_collate_restarts_positions_and_masks_example_starts():
    batch = packed_collate([[([5, 6, 7], [5, 6, 7]), ([8, 9], [8, 9])], [([4], [4])]], pad_token_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, -100, -100, -100, -100]]
    assert "attention_mask" not in batch


def test_pad_collate_and_supervised_count():
    batch = pad_collate([([1, 2, 3], [-100, 2, 3]), ([4], [-100])], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert num_supervised_tokens(batch["labels"]) == 2
    assert batch["labels"].dtype == torch.long
