"""Does mean pooling help an encoder classifier? Linear probes on frozen first-token vs mean-pooled features.

    python -m bench.pooling_probe all-minilm-l6-v2 all-mpnet-base-v2 [--data builtin:drugreview]

One no-grad pass of each encoder (``AutoModel``, max 128 tokens, reviews keep their end) over the
train and test splits gives both features from the same hidden states: the first token's final
hidden state (what a [CLS]/``<s>`` head reads) and the masked mean over real tokens
(``tunelab.models.heads.masked_mean``, what ``classification.pooling: mean`` feeds the head). A
scikit-learn logistic regression (C by 5-fold CV on train, class weights balanced) is fit on train
and scored on test. Writes ``bench/results/pooling-probe.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).parent / "results" / "pooling-probe.json"


def features(model_name: str, texts: list[str], batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    import torch
    from transformers import AutoModel

    from tunelab.models.heads import masked_mean
    from tunelab.models.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_name)
    tokenizer.truncation_side = "left"
    model = load_model(model_name, AutoModel).eval()
    first, mean = [], []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(texts[i:i + batch_size], truncation=True, max_length=128, padding=True,
                              return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            first.append(hidden[:, 0].numpy())
            mean.append(masked_mean(hidden, batch["attention_mask"]).numpy())
    return np.concatenate(first), np.concatenate(mean)


def probe(x_train, y_train, x_test, y_test) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    search = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, class_weight="balanced")),
                          {"logisticregression__C": [0.001, 0.01, 0.1, 1.0]}, scoring="f1_macro",
                          cv=StratifiedKFold(5, shuffle=True, random_state=0)).fit(x_train, y_train)
    pred = search.predict(x_test)
    return {"accuracy": round(accuracy_score(y_test, pred), 4), "macro_f1": round(f1_score(y_test, pred, average="macro"), 4),
            "C": search.best_params_["logisticregression__C"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--data", default="builtin:drugreview")
    args = parser.parse_args()
    import torch

    from tunelab.data.builtin import load_builtin

    torch.set_num_threads(2)
    name = args.data.removeprefix("builtin:")
    train, test = load_builtin(name, None, "train"), load_builtin(name, None, "test")
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
               "command": "python -m bench.pooling_probe " + " ".join(args.models) + f" --data {args.data}",
               "load_average_start": os.getloadavg(), "models": {}}
    for model_name in args.models:
        started = time.perf_counter()
        f_train, m_train = features(model_name, [r["text"] for r in train])
        f_test, m_test = features(model_name, [r["text"] for r in test])
        y_train, y_test = [r["label"] for r in train], [r["label"] for r in test]
        results["models"][model_name] = {"first_token": probe(f_train, y_train, f_test, y_test),
                                         "mean": probe(m_train, y_train, m_test, y_test),
                                         "seconds": round(time.perf_counter() - started, 1)}
        print(model_name, json.dumps(results["models"][model_name]), flush=True)
    results["load_average_end"] = os.getloadavg()
    OUT.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
