"""The fault tests run many tiny trainings: one torch thread each (on a busy machine, more threads
only contend; 1 thread is several times faster for a 32-wide model)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_model_dir(tmp_path, smollm2_tokenizer):
    """A tiny random Llama saved with the real SmolLM2 tokenizer: a local model the recipes load."""
    from tests.conftest import make_tiny_llama

    path = tmp_path / "tiny-llama"
    model = make_tiny_llama(vocab_size=len(smollm2_tokenizer))
    model.config.pad_token_id = smollm2_tokenizer.pad_token_id
    model.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path
