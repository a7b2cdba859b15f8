from pathlib import Path

from tunelab.config.reference import BEGIN, END, config_reference_markdown

README = Path(__file__).resolve().parents[3] / "README.md"


def test_readme_config_reference_is_current():
    text = README.read_text()
    embedded = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert embedded == config_reference_markdown().strip(), "run: tunelab config reference, paste into README"


def test_every_key_has_a_meaning():
    for line in config_reference_markdown().splitlines():
        if line.startswith("| `"):
            assert not line.rstrip().endswith("|  |") or "(section)" in line or "**required**" in line, line


def test_every_variant_of_a_union_section_is_documented():
    from tunelab.config.reference import config_reference_markdown

    text = config_reference_markdown()
    for key in ("rl.rewards[type=exact_match].reference_field", "rl.rewards[type=regex].pattern",
                "rl.rewards[type=length_penalty].max_tokens", "rl.rewards[type=reward_model].run_dir",
                "rl.rewards[type=python].function"):
        assert f"`{key}`" in text, key
    assert "FieldInfo" not in text
