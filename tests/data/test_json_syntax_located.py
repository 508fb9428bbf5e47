"""A preference table or a prompt file that is not valid JSON is refused in one line naming the file, the line and the
column of the first error, as a YAML config is: never ``datasets``' "An error occurred while generating the dataset"
or ``json``'s traceback. The location is computed here from the file's text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trl_diffusion_sdpo.cli.main import main
from trl_diffusion_sdpo.data.formats import json_syntax_error, read_table
from trl_diffusion_sdpo.data.validation import DataError
from trl_diffusion_sdpo.evaluation.prompts import load_prompt_set

TINY_CPU = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny_cpu.yaml"
GOOD = '{"prompt": "red", "chosen": "c.png", "rejected": "r.png"}'
# the second record lacks its closing brace: JSON stops at the end of its line
BROKEN = '{"prompt": "blue", "chosen": "c.png", "rejected": "r.png"'


def where_jsonl(lines: list[str], number: int) -> str:
    """The line and column json reports for line ``number`` (1-based) parsed alone."""
    try:
        json.loads(lines[number - 1])
    except json.JSONDecodeError as err:
        return f"{number}:{err.colno}"
    raise AssertionError("the line parses")


def test_a_broken_jsonl_table_names_the_line_and_column(tmp_path):
    lines = [GOOD, BROKEN, GOOD]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as refused:
        read_table(str(path))
    assert str(refused.value) == f"{path}:{where_jsonl(lines, 2)}: not valid JSON: Expecting ',' delimiter"


def test_a_broken_json_array_is_located_in_the_whole_document(tmp_path):
    text = "[\n  " + GOOD + ",\n  " + GOOD.replace('"r.png"}', '"r.png",}') + "\n]\n"
    path = tmp_path / "pairs.json"
    path.write_text(text)
    comma = text.index(",}")
    line = text.count("\n", 0, comma) + 1
    column = comma - text.rindex("\n", 0, comma) + 1  # the brace after the trailing comma, 1-based
    assert json_syntax_error(str(path)) == (
        f"{path}:{line}:{column}: not valid JSON: Expecting property name enclosed in double quotes"
    )


def test_valid_json_has_no_syntax_error(tmp_path):
    lines = tmp_path / "a.jsonl"
    lines.write_text(GOOD + "\n" + GOOD + "\n")
    array = tmp_path / "a.json"
    array.write_text(json.dumps([json.loads(GOOD)]))
    assert json_syntax_error(str(lines)) is None and json_syntax_error(str(array)) is None


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_broken_prompt_file_names_the_line_and_column(tmp_path, suffix):
    if suffix == ".jsonl":
        lines = ['{"prompt": "red"}', '{"prompt": "blue"']
        text, expected = "\n".join(lines) + "\n", f"{where_jsonl(lines, 2)}: not valid JSON: Expecting ',' delimiter"
    else:
        text = '[{"prompt": "red"},\n {"prompt": "blue",}]\n'
        second = text.splitlines()[1]
        column = second.index("}") + 1
        expected = f"2:{column}: not valid JSON: Expecting property name enclosed in double quotes"
    path = tmp_path / f"prompts{suffix}"
    path.write_text(text)
    with pytest.raises(ValueError) as refused:
        load_prompt_set(str(path))
    assert str(refused.value) == f"{path}:{expected}"


def test_train_on_a_broken_jsonl_ends_in_one_line(tmp_path, capsys):
    lines = [GOOD, BROKEN]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    code = main(["train", "--config", str(TINY_CPU), "--dataset_name", str(path), "--output_dir", str(tmp_path / "o")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 1 and "Traceback" not in "\n".join(err), err  # a data error: exit status 1
    assert err[-1] == f"trl-diffusion-sdpo train: error: {path}:{where_jsonl(lines, 2)}: not valid JSON: " + (
        "Expecting ',' delimiter"
    )
