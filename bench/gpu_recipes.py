"""Issue 19 GPU check: one run of every recipe on one GPU under FSDP2 + bf16 with NCCL (see gpu_fsdp_check.py).

Everything is built in code (no download): a random Llama saved with a byte-level BPE tokenizer and a
ChatML-like template, small synthetic data files for each task, and a config per task with
``distributed.strategy: fsdp``, ``train.precision: bf16`` (on CUDA) and a checkpoint every 2 steps. Each
recipe then runs through its own ``train(config)`` (the code path ``tunelab train`` takes) and the check
reports its wall time, peak GPU memory, first/last logged loss, and whether it really ran sharded (its
checkpoint is a ``torch.distributed.checkpoint`` directory, not the one-process layout).

``plan()`` writes model, data and configs and validates every config, without training: the CPU test
(``tests/unit/test_gpu_recipes_plan.py``) runs that path.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

TASKS = ("sft", "classification", "reward", "dpo", "kto", "grpo", "ppo")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ("the printer is not printing again please check paper tray restart driver thanks it works now "
         "what is plus minus equals good bad great terrible answer question one two three four five").split()


def model_size(cuda: bool) -> dict[str, int]:
    """~100M-parameter Llama on a GPU (fits with room to spare), a 2-layer toy on CPU."""
    if cuda:
        return dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
                    num_key_value_heads=4)
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def build_tokenizer():
    """A byte-level BPE tokenizer trained on :data:`WORDS`, with pad/eos and a ChatML-like template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 4, trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>",
                                  additional_special_tokens=specials[1:3])
    out.chat_template = CHATML
    return out


def write_model(directory: Path, cuda: bool) -> str:
    """Save a random-init Llama (fp32 weights) and the tokenizer as a local model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **model_size(cuda))
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def _sentence(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n))


def write_data(root: Path, n: int = 48) -> dict[str, str]:
    """One JSONL file per data shape: chat, labelled text, preference pairs, RL prompts with answers."""
    rows = {
        "chat": [{"messages": [{"role": "user", "content": _sentence(i, 6)},
                               {"role": "assistant", "content": _sentence(i + 1, 4 + i % 9)}]} for i in range(n)],
        "labels": [{"text": _sentence(i, 5 + i % 7), "label": ["bad", "good"][i % 2]} for i in range(n)],
        "pairs": [{"prompt": _sentence(i, 5), "chosen": _sentence(i + 2, 3 + i % 5),
                   "rejected": _sentence(i + 5, 6 + i % 4)} for i in range(n)],
        "prompts": [{"prompt": f"what is {i} plus {i % 5}", "answer": str(i + i % 5)} for i in range(n)],
    }
    paths = {}
    for name, records in rows.items():
        paths[name] = str(root / f"{name}.jsonl")
        Path(paths[name]).write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths


def recipe_config(task: str, model_dir: str, data: dict[str, str], output_dir: Path, cuda: bool) -> dict[str, Any]:
    """The config dict of one run of ``task`` (4 optimizer or RL steps, checkpoint at 2, FSDP2, bf16 on CUDA)."""
    config: dict[str, Any] = {
        "task": "dpo" if task == "kto" else task, "output_dir": str(output_dir), "model": {"name_or_path": model_dir},
        "data": {"train": {"path": data["chat"]}, "val_fraction": 0.1, "max_seq_len": 128},
        "lora": {"r": 8, "alpha": 16}, "distributed": {"strategy": "fsdp"},
        "train": {"method": "lora", "max_steps": 4, "batch_size": 4, "lr": 1e-4, "save_every": 2,
                  "precision": "bf16" if cuda else "fp32", "threads": 2},
        "eval": {"batch_size": 8, "before_training": False},
    }
    if task == "sft":
        config["eval"]["sample_questions"] = 1
    elif task == "classification":
        config["data"]["train"] = {"path": data["labels"]}
        config["classification"] = {"text_field": "text", "label_field": "label", "labels": ["bad", "good"]}
    elif task in ("reward", "dpo", "kto"):
        config["data"].update(train={"path": data["pairs"]}, packing=False)
        if task != "reward":
            config["preference"] = {"loss": task, "beta": 0.1}
            config["eval"]["sample_questions"] = 0
    else:  # grpo, ppo: programmable rewards, no reward-model run needed
        config["data"] = {"train": {"path": data["prompts"]}, "val_fraction": 0.1}
        config["rl"] = {"num_generations": 4, "max_new_tokens": 16, "max_prompt_len": 64, "eval_prompts": 4,
                        "rewards": [{"type": "exact_match"}, {"type": "length_penalty", "max_tokens": 4}]}
        if task == "grpo":
            config["rl"]["beta"] = 0.05
    return config


def plan(root: Path, cuda: bool, tasks=TASKS) -> dict[str, Any]:
    """Write model, data and one validated config per task under ``root``; returns ``{task: Config}``.

    Raises:
        TunelabError (ConfigError): a config the schema rejects.
    """
    from tunelab.config.load import validate_config

    root.mkdir(parents=True, exist_ok=True)
    model_dir = write_model(root / "model", cuda)
    data = write_data(root)
    return {task: validate_config(recipe_config(task, model_dir, data, root / f"run-{task}", cuda)) for task in tasks}


def run_recipe(task: str, config) -> dict[str, Any]:
    """Train ``config`` with its recipe; returns what the check prints (or the error it raised)."""
    from rich.console import Console

    from tunelab.recipes import get_recipe

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        get_recipe(config.task)(config, console=Console(quiet=True))
    except Exception as error:  # noqa: BLE001 - the check reports every recipe, then fails
        return {"task": task, "ok": False, "error": f"{type(error).__name__}: {str(error)[:300]}"}
    out = Path(config.output_dir)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().split("\n") if line]
    losses = [r["loss"] for r in records if "loss" in r]
    sharded = (out / "checkpoints" / "step-000002" / ".metadata").is_file()
    return {"task": task, "ok": sharded and bool(losses) and all(map(_finite, losses)),
            "sharded_checkpoint": sharded, "seconds": round(time.perf_counter() - started, 1),
            "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "steps_logged": len(losses)}


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")
