"""What the README and the docs say a result file holds, it holds: read on both sides.

- A sentence (or table row) that names a result file and quotes a duration quotes one of the file's own figures (a
  value, a number in its text, or a median, mean or sum of one of its lists) at the precision written.
- A sentence that names a file of timed commands (``steps``, each a ``command`` with its ``wall_s``) names only
  commands the file times, and names the demo or the Python example only if the file times them.
- No page gives a duration in words alone ("a few minutes"): a duration is a figure with its file, or "not measured".
- The README states the demo's time as the demo's own record of it.

``tests/docs/test_docs.py`` checks that each such section names a file at all, and ``test_results_files.py`` that
the named files exist; these read what is in them."""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.docs_pages import RESULT_FILE, _expand, result_folders

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
DEMO_RECORD = ROOT / "docs" / "images" / "demo_summary.json"
DURATION = re.compile(r"(?<![\w.-])(\d[\d,]*(?:\.\d+)?) ?(ms|s|min|minutes|h|hours)(?!\w)")
SECONDS = {"ms": 1e-3, "s": 1.0, "min": 60.0, "minutes": 60.0, "h": 3600.0, "hours": 3600.0}
# A duration in words only, in prose or in a command's comment.
VAGUE = re.compile(r"\b(?:a few|several|few) (?:seconds|minutes|hours)\b|\bin minutes\b", re.IGNORECASE)


def result_path(name: str) -> Path | None:
    """The file a page names: a path from the repository root or ``docs/``, or a bare name in ``benchmarks/results/``
    or one of its folders."""
    name = name.lstrip("./")
    base = name.rsplit("/", 1)[-1]
    results = ROOT / "benchmarks" / "results"
    for candidate in (ROOT / name, ROOT / "docs" / name, results / base, *(f / base for f in result_folders())):
        if candidate.is_file() and candidate.suffix == ".json":
            return candidate
    return None


def file_figures(value: object) -> Iterator[float]:
    """Every figure a result file holds: its numbers, the numbers written in its text, and the median, mean and sum
    of each list of numbers (the statistics its pages quote)."""
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield float(value)
    elif isinstance(value, str):
        yield from (float(n.replace(",", "")) for n in re.findall(r"\d[\d,]*(?:\.\d+)?", value))
    elif isinstance(value, dict):
        for item in value.values():
            yield from file_figures(item)
    elif isinstance(value, list):
        numbers = [float(v) for v in value if isinstance(v, int | float) and not isinstance(v, bool)]
        if len(numbers) > 1:
            yield from (statistics.median(numbers), statistics.fmean(numbers), sum(numbers))
        for item in value:
            yield from file_figures(item)


def holds(quoted: str, unit: str, figures: list[float]) -> bool:
    """Whether a figure, in seconds or in ``unit``, rounds to ``quoted`` at the precision written."""
    digits = len(quoted.split(".")[1]) if "." in quoted else 0
    wanted, half = float(quoted.replace(",", "")), 0.5 * 10**-digits + 1e-9
    return any(abs(f - wanted) <= half or abs(f / SECONDS[unit] - wanted) <= half for f in figures)


def citing_units(text: str) -> Iterator[tuple[str, list[Path]]]:
    """Each sentence or table row of prose (code blocks left out, inline code kept) with the result files it names."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)  # commands, not claims
    for paragraph in re.split(r"\n\s*\n|^#+ ", prose, flags=re.MULTILINE):
        for row in paragraph.split("\n|"):
            for sentence in re.split(r"(?<=[.;])\s+(?=[A-Z(`\[])", row):
                named = [result_path(n) for found in RESULT_FILE.findall(sentence) for n in _expand(found)]
                files = sorted({path for path in named if path is not None})
                if files:
                    yield " ".join(sentence.split()), files


def unheld_durations(text: str) -> list[str]:
    """The durations a text quotes beside result files that hold no such figure."""
    wrong = []
    for sentence, files in citing_units(text):
        figures = [f for path in files for f in file_figures(json.loads(path.read_text()))]
        for quoted, unit in DURATION.findall(sentence):
            if not holds(quoted, unit, figures):
                wrong.append(f"{quoted} {unit} not in {[p.name for p in files]}: {sentence[:160]}")
    return wrong


def timed_commands(record: dict) -> list[str]:
    """A file's timed commands: the word after the program (``train``, ``export``), or the program itself."""
    words = [step["command"].split() for step in record["steps"]]
    return [w[1] if w[0] == "trl-diffusion-sdpo" and len(w) > 1 else w[0] for w in words]


def unheld_commands(text: str) -> list[str]:
    """What a sentence says a file of timed commands times and the file does not time."""
    wrong = []
    for sentence, files in citing_units(text):
        for path in files:
            record = json.loads(path.read_text())
            if not isinstance(record, dict) or not isinstance(record.get("steps"), list):
                continue
            timed = timed_commands(record)
            named = re.findall(r"`(?:trl-diffusion-sdpo )?([a-z][a-z-]*)`", sentence)
            wrong += [f"`{n}` is not timed in {path.name}" for n in named if n not in timed]
            commands = " ".join(step["command"] for step in record["steps"])
            if re.search(r"\bthe demo\b", sentence) and " demo" not in commands:
                wrong.append(f"the demo is not timed in {path.name}")
            if re.search(r"\bPython example\b", sentence) and not re.search(r"\bpython\b", commands):
                wrong.append(f"the Python example is not timed in {path.name}")
    return wrong


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_duration_quoted_beside_a_result_file_is_a_figure_of_that_file(page: Path) -> None:
    assert unheld_durations(page.read_text()) == []


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_a_sentence_citing_timed_commands_names_only_what_the_file_times(page: Path) -> None:
    assert unheld_commands(page.read_text()) == []


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_no_page_gives_a_duration_in_words_alone(page: Path) -> None:
    found = [line.strip() for line in page.read_text().splitlines() if VAGUE.search(line)]
    assert found == [], f"{page.relative_to(ROOT)}: give the measured figure with its file, or 'not measured'"


def test_the_readme_states_the_demos_time_from_the_demos_record() -> None:
    total = json.loads(DEMO_RECORD.read_text())["timings"]["total_seconds"]
    readme = (ROOT / "README.md").read_text()
    quoted = [
        (q, unit) for s, files in citing_units(readme) if DEMO_RECORD in files for q, unit in DURATION.findall(s)
    ]
    quoted = [q for q, unit in quoted if holds(q, unit, [total])]
    assert quoted, f"the README quotes the demo's {total:.0f} s nowhere beside {DEMO_RECORD.relative_to(ROOT)}"


FIRST_HOUR = "benchmarks/results/cli/cpu-first-hour-fresh-clone-idle.json"


def test_the_checks_find_a_wrong_figure_a_wrong_list_and_a_vague_duration() -> None:
    record = json.loads((ROOT / FIRST_HOUR).read_text())
    train = next(step["wall_s"] for step in record["steps"] if step["step"] == "train")
    right = f"`train` took {train} s ([the timed runs]({FIRST_HOUR}))."
    assert unheld_durations(right) == [] and unheld_commands(right) == []
    assert unheld_durations(right.replace(f"{train} s", f"{train + 0.2:.1f} s")) != []
    assert unheld_durations(right.replace(f"{train} s", f"{train / 60:.2f} min")) == []  # the unit converted
    old = f"How long the demo, the Python example and each command above take: [the timed runs]({FIRST_HOUR})."
    assert unheld_commands(old) == [
        "the demo is not timed in cpu-first-hour-fresh-clone-idle.json",
        "the Python example is not timed in cpu-first-hour-fresh-clone-idle.json",
    ]
    assert unheld_commands(right.replace("`train`", "`evaluate`")) == [
        "`evaluate` is not timed in cpu-first-hour-fresh-clone-idle.json"
    ]
    assert VAGUE.search("# The demo, from a clone: offline, a few minutes (below)")
    assert not VAGUE.search("143 s of its own work; a cold start: not measured")
