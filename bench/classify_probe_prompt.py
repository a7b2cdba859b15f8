"""Train-only diagnostic for the drug-review task: does wrapping a review in an instruction make frozen
SmolLM2 last-token features better for a linear probe? 5-fold CV on the 600 training reviews (no test data).

    flock /tmp/tunelab-cpu.lock .venv/bin/python -m bench.classify_probe_prompt plain suffix chat

Prints CV accuracy and macro-F1 of a standardized logistic regression (balanced class weights) per text
variant and C. Features: the final hidden state (576 floats) at the last token, reviews left-truncated to
256 tokens, left padding — what ``classification.head_init: linear_probe`` reads.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import numpy as np
import torch


def features(model, tokenizer, texts: list[str], batch_size: int = 16) -> np.ndarray:
    """(N, H) float32 last-token hidden states of ``texts``."""
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                              max_length=256, padding_side="left")
            out.append(model.model(**batch).last_hidden_state[:, -1].float().numpy())
    return np.concatenate(out)


def main(names: list[str]) -> None:
    """Print the CV scores of each named variant (plain, suffix, chat)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from transformers import AutoModelForCausalLM

    from tunelab.data.builtin import load_builtin
    from tunelab.models.loading import load_tokenizer, resolve_model_path

    torch.set_num_threads(2)
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    tokenizer.truncation_side = "left"
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("smollm2-135m-instruct"),
                                                 dtype=torch.float32).eval()
    train = load_builtin("drugreview", None, "train")
    labels = np.array([r["label"] for r in train])
    question = "Is this review positive, neutral or negative?"
    variants: dict[str, Callable[[str], str]] = {
        "plain": lambda t: t,
        "suffix": lambda t: f"Patient review of a drug:\n{t}\n{question} Answer:",
        "chat": lambda t: tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Patient review of a drug:\n{t}\n\n{question}"}], tokenize=False,
            add_generation_prompt=True),
    }
    for name in names:
        started = time.time()
        x = features(model, tokenizer, [variants[name](r["text"]) for r in train])
        for c in (0.01, 0.1, 1.0):
            probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000, class_weight="balanced"))
            pred = cross_val_predict(probe, x, labels, cv=StratifiedKFold(5, shuffle=True, random_state=0))
            print(f"{name} {c} cv acc {accuracy_score(labels, pred):.4f} "
                  f"macroF1 {f1_score(labels, pred, average='macro'):.4f} {time.time() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["plain", "suffix", "chat"])
