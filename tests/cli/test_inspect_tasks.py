"""``tunelab data inspect`` shows each task's data as that task's recipe will see it."""

import json

from rich.console import Console

from tunelab.cli.inspect_data import inspect_data, render_supervision
from tunelab.config.load import load_config
from tunelab.data.tokenize import TokenizedExample


def run_inspect(tmp_path, body: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(f"model: {{name_or_path: smollm2-135m-instruct}}\noutput_dir: {tmp_path / 'run'}\n{body}")
    console = Console(record=True, width=200)
    inspect_data(load_config(path, []), 1, console)
    return console.export_text()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_preference_pairs_show_both_replies_and_drop_counts(tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
        {"prompt": "Two plus two?", "chosen": "", "rejected": "Five."},
    ])
    out = run_inspect(tmp_path, f"task: dpo\ndata: {{train: {{path: {data}}}}}\n")
    assert "train pair 0 chosen" in out and "train pair 0 rejected" in out
    assert "Paris." in out and "Lyon." in out
    assert "empty chosen reply" in out  # the dropped pair is counted, by reason


def test_classification_shows_label_and_counts(tmp_path):
    data = write_jsonl(tmp_path / "c.jsonl", [{"text": "great drug", "label": "pos"}, {"text": "awful", "label": "neg"},
                                              {"text": "fine", "label": "pos"}])
    out = run_inspect(tmp_path, f"task: classification\ndata: {{train: {{path: {data}}}}}\n"
                                "classification: {text_field: text, label_field: label}\n")
    assert "target pos" in out and "great drug" in out
    assert "'neg': 1" in out and "'pos': 2" in out


def test_rl_prompts_show_rendered_prompt_and_drops(tmp_path):
    data = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "What is 2+3?", "answer": "5"},
                                              {"prompt": "What is 2+3?", "answer": "5"},
                                              {"prompt": "word " * 300, "answer": "1"}])
    out = run_inspect(tmp_path, f"task: grpo\ndata: {{train: {{path: {data}}}}}\n"
                                "rl: {max_prompt_len: 64, rewards: [{type: exact_match}]}\n")
    assert "<|im_start|>assistant" in out and "What is 2+3?" in out
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in out.splitlines() if line.count("│") == 3}
    assert rows["dropped: longer than rl.max_prompt_len"] == "1" and rows["dropped: duplicate prompt"] == "1"
    assert rows["prompts kept"] == "1"


def test_render_supervision_keeps_wordpiece_spacing():
    class WordPiece:  # decodes like BERT: '##' pieces join the previous word, others get a space
        vocab = ["[CLS]", "the", "drug", "help", "##ed"]

        def decode(self, ids):
            words = []
            for i in ids:
                piece = self.vocab[i]
                if piece.startswith("##") and words:
                    words[-1] += piece[2:]
                else:
                    words.append(piece)
            return " ".join(words)

    text = render_supervision(WordPiece(), TokenizedExample([0, 1, 2, 3, 4], [-100, -100, 2, 3, 4]))
    assert text.plain == "[CLS] the drug helped"


def test_text_file_sources_show_file_names_per_split(tmp_path):
    """Issue 18 item 1: `data inspect` names the file of each example and lists each split's files
    (fails on the old code: a glob was read as a hub dataset id)."""
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    for i in range(4):
        (corpus / "sub" / f"mod{i}.py").write_text(f"def f{i}():\n    return {i}\n" * (i + 1))
    out = run_inspect(tmp_path, f"data: {{train: {{path: '{corpus}/**/*.py'}}, val_fraction: 0.25, max_seq_len: 32}}\n")
    assert f"train example 0 from {corpus}/sub/mod" in out
    assert "train files: 3" in out and "held-out files: 1" in out
    assert sum(f"{corpus}/sub/mod{i}.py" in out for i in range(4)) == 4


def test_text_sources_show_the_stride_not_conversation_settings_and_count_duplicate_files_apart(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("a.py", "b.py", "copy_of_a.py", "d.py", "e.py"):
        (corpus / name).write_text((corpus / "a.py").read_text() if name == "copy_of_a.py" else
                                   f"def {name[0]}():\n    return '{name}'\n" * 3)
    out = run_inspect(tmp_path, f"data: {{train: {{path: '{corpus}/*.py'}}, val_fraction: 0.2, max_seq_len: 32, "
                                "chunk_stride: 20}\n")
    assert "chunk_stride 20" in out and "targets" in out
    assert "legend: supervised" not in out and "rendering" not in out
    assert "whose chunks all duplicate others" in out
