"""Rollout generation: left-padded batched greedy equals one-at-a-time greedy; stop tokens; masks."""

import torch

from tunelab.data.stop_tokens import stop_token_ids
from tunelab.rollout.generate import completion_mask, sample_completions
from tunelab.rollout.prompts import Prompt, collate_prompts
from tests.conftest import make_tiny_llama

STOP = [2]


def _prompts():
    gen = torch.Generator().manual_seed(0)
    return [Prompt([{"role": "user", "content": str(n)}], torch.randint(3, 97, (n,), generator=gen).tolist(), {})
            for n in (3, 9, 5, 1)]


def test_completion_mask_stops_after_first_stop_token_inclusive():
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0]])
    mask, truncated = completion_mask(ids, [2])
    assert mask.tolist() == [[True, True, True, False, False], [True] * 5, [True, False, False, False, False]]
    assert truncated.tolist() == [False, True, False]


def test_batched_left_padded_greedy_equals_single_prompt_greedy():
    model = make_tiny_llama()
    prompts = _prompts()
    ids, mask = collate_prompts(prompts, pad_id=0)
    assert not mask[0, 0] and mask[:, -1].all()  # really left-padded, with different lengths
    batched = sample_completions(model, ids, mask, max_new_tokens=12, stop_ids=STOP, pad_id=0, greedy=True)
    for row, prompt in enumerate(prompts):
        one_ids, one_mask = collate_prompts([prompt], pad_id=0)
        single = sample_completions(model, one_ids, one_mask, max_new_tokens=12, stop_ids=STOP, pad_id=0, greedy=True)
        n = int(single.completion_mask.sum())
        assert int(batched.completion_mask[row].sum()) == n
        assert batched.completion_ids[row, :n].tolist() == single.completion_ids[0, :n].tolist()
    # guard: the rows really differ, so a broken padding/position scheme would show
    assert len({tuple(r.tolist()) for r in batched.completion_ids}) > 1


def test_greedy_with_kv_cache_matches_full_recompute():
    model = make_tiny_llama()
    ids, mask = collate_prompts(_prompts()[:1], pad_id=0)
    out = sample_completions(model, ids, mask, max_new_tokens=6, stop_ids=[-1], pad_id=0, greedy=True)
    seq = ids[0].tolist()
    for _ in range(6):
        with torch.no_grad():
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert out.completion_ids[0].tolist() == seq[ids.shape[1]:]


def test_sampling_stops_at_stop_token_and_pads_after():
    model = make_tiny_llama()
    with torch.no_grad():  # make the stop token very likely so rows end early
        model.lm_head.weight[2] += 3.0 * model.model.norm.weight.sign()
    ids, mask = collate_prompts(_prompts(), pad_id=0)
    out = sample_completions(model, ids, mask, max_new_tokens=20, stop_ids=STOP, pad_id=0, temperature=1.0,
                             top_p=0.9, generator=torch.Generator().manual_seed(1))
    assert (~out.truncated).any() and out.completion_ids.shape[1] <= 20
    for row in range(len(out.completion_ids)):
        n = int(out.completion_mask[row].sum())
        if not out.truncated[row]:
            assert out.completion_ids[row, n - 1] == 2 and (out.completion_ids[row, :n - 1] != 2).all()
        assert (out.completion_ids[row, n:] == 0).all()


def test_top_p_keeps_only_the_nucleus():
    from tunelab.rollout.generate import _pick

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    picks = {int(_pick(logits, 1.0, 0.7, False, gen)) for _ in range(300)}
    assert picks == {0, 1}  # 0.5 + 0.3 >= 0.7: tokens 2 and 3 are never sampled


def test_stop_token_ids_include_end_of_turn(smollm2_tokenizer):
    assert smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(smollm2_tokenizer)
