import json

import pytest

from tunelab.config.schema import DataSource
from tunelab.data.formats import detect_format, to_example
from tunelab.data.sources import load_records
from tunelab.errors import DataError


def test_detects_each_format():
    assert detect_format({"messages": []}, {}) == "messages"
    assert detect_format({"conversations": [{"from": "human", "value": "x"}]}, {}) == "sharegpt"
    assert detect_format({"instruction": "a", "output": "b"}, {}) == "alpaca"
    assert detect_format({"prompt": "a", "completion": "b"}, {}) == "prompt_completion"
    assert detect_format({"text": "a"}, {}) == "text"
    assert detect_format({"question": "a", "answer": "b"}, {"prompt": "question", "completion": "answer"}) == "prompt_completion"
    with pytest.raises(DataError, match="data.format"):
        detect_format({"foo": 1}, {})


def test_sharegpt_roles_map_to_messages():
    record = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                                {"from": "gpt", "value": "a"}]}
    assert to_example(record, "sharegpt", {}, "r") == {"messages": [
        {"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


def test_alpaca_joins_instruction_and_input():
    example = to_example({"instruction": "Translate", "input": "hola", "output": "hello"}, "alpaca", {}, "r")
    assert example["messages"][0]["content"] == "Translate\n\nhola"
    assert example["messages"][1] == {"role": "assistant", "content": "hello"}


def test_column_mapping():
    example = to_example({"q": "hi", "a": "yo"}, "prompt_completion", {"prompt": "q", "completion": "a"}, "r")
    assert example == {"prompt": "hi", "completion": "yo"}


def test_missing_field_names_record_and_expected_fields():
    with pytest.raises(DataError) as err:
        to_example({"instruction": "x"}, "alpaca", {}, "train.jsonl record #7")
    assert "record #7" in str(err.value) and "'output'" in str(err.value) and "instruction" in str(err.value)


def test_missing_field_lists_only_the_fields_that_record_has(tmp_path):
    """datasets merges every record's keys into one schema; the error must not name other records' fields."""
    from tunelab.config.schema import DataConfig
    from tunelab.data.pipeline import load_canonical

    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"instruction": "a", "input": "x", "output": "b", "system": "s"}) + "\n"
                    + json.dumps({"instruction": "c", "note": "n"}) + "\n")
    assert load_records(DataSource(path=str(path)))[1] == {"instruction": "c", "note": "n"}
    cfg = DataConfig(train=DataSource(path=str(path)))
    with pytest.raises(DataError) as err:
        load_canonical(cfg.train, cfg)
    message = str(err.value)
    assert f"{path} record #2" in message and "missing 'output'" in message
    assert "record has ['instruction', 'note']" in message and "system" not in message


def test_columnar_sources_list_only_fields_with_a_value(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("prompt,completion,extra\na,b,\nc,,\n")
    records = load_records(DataSource(path=str(path)))
    with pytest.raises(DataError, match=r"record #2: .*missing 'completion' \(record has \['prompt'\]\)"):
        to_example(records[1], "prompt_completion", {}, f"{path} record #2")


def test_bad_role_is_named():
    with pytest.raises(DataError, match="turn 1 has role 'robot'"):
        to_example({"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]},
                   "messages", {}, "r")


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n\n" + '{"text": "broken"\n')
    with pytest.raises(DataError) as err:
        load_records(DataSource(path=str(path)))
    assert f"{path}:3" in str(err.value)


def test_local_jsonl_csv_parquet(tmp_path):
    import datasets

    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "d.csv"), index=False)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    for name in ("d.jsonl", "d.csv", "d.parquet"):
        assert load_records(DataSource(path=str(tmp_path / name))) == rows


@pytest.mark.parametrize("name, content, needles", [
    ("empty.jsonl", "", ["the file has no records"]),
    ("blank.jsonl", "\n  \n", ["the file has no records"]),
    ("empty.json", "", ["the file has no records"]),
    ("empty-array.json", "[]", ["the file has no records"]),
    ("empty.csv", "", ["the file has no records"]),
    ("header-only.csv", "prompt,completion\n", ["the file has no records"]),
    ("text.json", "just some text\n", [":1: malformed JSON", "JSON array of objects"]),
    ("broken.json", '[{"prompt": "a"},\n {"prompt": }]', [":2: malformed JSON", "JSON array of objects"]),
    ("scalar.json", '"a string"', ["holds a single JSON str", "JSON array of objects"]),
    ("numbers.json", "[1, 2]", ["array element #1 is not a JSON object: 1"]),
    ("extra-field.csv", "prompt,completion\na,b\nc,d,e\n", [":3: malformed CSV: 3 field(s)", "has 2"]),
    ("unclosed-quote.csv", 'prompt,completion\na,b\n"c,d\n', [":3: malformed CSV: 1 field(s)", "close every quote"]),
    ("zero-bytes.parquet", "", ["not a readable Parquet file"]),
])
def test_unreadable_local_files_name_the_file_and_say_why(tmp_path, name, content, needles):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as err:
        load_records(DataSource(path=str(path)))
    assert str(err.value).startswith(str(path))
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_json_file_may_hold_an_array_one_object_or_json_lines(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    (tmp_path / "array.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "one.json").write_text(json.dumps(rows[0], indent=2))
    assert load_records(DataSource(path=str(tmp_path / "array.json"))) == rows
    assert load_records(DataSource(path=str(tmp_path / "lines.json"))) == rows
    assert load_records(DataSource(path=str(tmp_path / "one.json"))) == rows[:1]


def test_parquet_with_no_rows_has_no_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    with pytest.raises(DataError, match="the file has no records"):
        load_records(DataSource(path=str(path)))


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_records(DataSource(path=str(tmp_path / "nope.jsonl")))


def test_builtin_chatterbot_splits_by_question():
    train = load_records(DataSource(path="builtin:chatterbot", split="train"))
    held = load_records(DataSource(path="builtin:chatterbot", split="validation"))
    train_q = {r["messages"][0]["content"] for r in train}
    held_q = {r["messages"][0]["content"] for r in held}
    assert train and held and not (train_q & held_q)


def test_undetectable_format_names_the_file_and_the_close_field(tmp_path):
    """A misspelled key ({"mesages": ...}) used to give an error that named neither file nor record."""
    from tunelab.config.schema import DataConfig, DataSource
    from tunelab.data.pipeline import load_canonical
    from tunelab.errors import DataError

    path = tmp_path / "typo.jsonl"
    path.write_text('{"mesages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    source = DataSource(path=str(path))
    with pytest.raises(DataError, match=r"typo\.jsonl record #1: cannot detect.*'mesages': did you mean 'messages'"):
        load_canonical(source, DataConfig(train=source))
