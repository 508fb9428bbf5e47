"""What the README and the docs say a result file holds, it holds: read on both sides.

- A sentence (or table row) that names a result file and quotes a duration quotes one of the file's own figures (a
  value, a number in its text, or a median, mean or sum of one of its lists) at the precision written.
- A sentence that names a file of timed commands (``steps``, each a ``command`` with its ``wall_s``) names only
  commands the file times, and names the demo or the Python example only if the file times them.
- No page gives a duration in words alone ("a few minutes"): a duration is a figure with its file, or "not measured".
- The README and the demo's page state the demo's wall time cold and warm, with the machine and its load, as its
  timed runs' file records them.

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


def citing_units(text: str, every: bool = False) -> Iterator[tuple[str, list[Path]]]:
    """Each sentence or table row of prose (code blocks left out, inline code kept) with the result files it names;
    ``every``: those that name none too."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)  # commands, not claims
    for paragraph in re.split(r"\n\s*\n|^#+ ", prose, flags=re.MULTILINE):
        for row in paragraph.split("\n|"):
            for sentence in re.split(r"(?<=[.;])\s+(?=[A-Z(`\[])", row):
                named = [result_path(n) for found in RESULT_FILE.findall(sentence) for n in _expand(found)]
                files = sorted({path for path in named if path is not None})
                if files or every:
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


# The demo's wall time, cold and warm: benchmarks/smoke/demo_time.py's record
DEMO_TIME = ROOT / "benchmarks" / "results" / "demo" / "cpu-demo-time.json"
DEMO_RUN = re.compile(r"(\d[\d,]*) s (cold|warm)\b")


def demo_time_claims(text: str) -> list[tuple[str, float, str, list[Path]]]:
    """Each "N s cold" / "N s warm" a text gives: the run, the seconds, its sentence and the files it names."""
    return [
        (run, float(seconds.replace(",", "")), sentence, files)
        for sentence, files in citing_units(text, every=True)
        for seconds, run in DEMO_RUN.findall(sentence)
    ]


def wrong_demo_times(text: str, record: dict) -> list[str]:
    """What a text says of the demo's time cold or warm that its record does not hold: seconds other than the run's
    wall time, a sentence that does not name the record, or one without the machine's cores and the load while each
    run ran (the median of the 1-minute load average)."""
    steps = {step["step"]: step for step in record["steps"]}
    loads = [f"{step['load_1min_during']['median']:g}" for step in record["steps"]]
    wrong = []
    for run, seconds, sentence, files in demo_time_claims(text):
        if DEMO_TIME not in files:
            wrong.append(f"{seconds:g} s {run}: names no {DEMO_TIME.name}")
        elif round(steps[run]["wall_s"]) != seconds:
            wrong.append(f"{seconds:g} s {run}: the {run} run took {steps[run]['wall_s']} s")
        elif f"{record['machine']['cpu_cores']}-core" not in sentence or not all(x in sentence for x in loads):
            wrong.append(f"{seconds:g} s {run}: the machine's cores or the load {loads} are not stated")
    return wrong


@pytest.mark.parametrize("page", [ROOT / "README.md", ROOT / "docs" / "demo.md"], ids=["README.md", "docs/demo.md"])
def test_the_demos_time_is_stated_cold_and_warm_from_its_timed_runs(page: Path) -> None:
    record = json.loads(DEMO_TIME.read_text())
    text = page.read_text()
    assert {run for run, *_ in demo_time_claims(text)} == {"cold", "warm"}, "state the demo's time cold and warm"
    assert wrong_demo_times(text, record) == []


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_no_page_states_another_demo_time(page: Path) -> None:
    assert wrong_demo_times(page.read_text(), json.loads(DEMO_TIME.read_text())) == []


def test_the_demo_time_check_finds_a_wrong_figure_and_an_unstated_load() -> None:
    record = json.loads(DEMO_TIME.read_text())
    cold, warm = (step for step in record["steps"])
    cores, loads = record["machine"]["cpu_cores"], [f"{s['load_1min_during']['median']:g}" for s in (cold, warm)]
    right = (
        f"On a {cores}-core CPU (load {loads[0]} and {loads[1]}) it took {round(cold['wall_s'])} s cold and "
        f"{round(warm['wall_s'])} s warm (`{DEMO_TIME.relative_to(ROOT)}`)."
    )
    assert wrong_demo_times(right, record) == []
    assert wrong_demo_times(right.replace(f"{round(cold['wall_s'])} s cold", "143 s cold"), record) != []
    assert wrong_demo_times(right.replace(f" (load {loads[0]} and {loads[1]})", ""), record) != []
    assert wrong_demo_times(right.replace(f" (`{DEMO_TIME.relative_to(ROOT)}`)", ""), record) != []


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
