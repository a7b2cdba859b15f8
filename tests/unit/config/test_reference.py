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
