"""The documentation site builds with ``mkdocs build --strict``: every page in the nav, every link and anchor
resolved (a link out of ``docs/`` fails it), every mkdocstrings ``:::`` reference importable, the API reference
generated from docstrings without a warning. The build runs in the default suite, so every fresh clone checks it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.docs_pages import RESULT_FILE, ROOT, _expand, result_folders


@pytest.mark.slow  # builds the whole site (mkdocs): minutes on 2 cores
def test_docs_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    pytest.importorskip("material")
    env = dict(os.environ, PYTHONPATH=str(ROOT), NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    site = tmp_path / "site"
    for page in ("quickstart", "concepts", "data", "families", "distributed", "evaluation", "benchmarks", "faq"):
        assert (site / page / "index.html").is_file(), page
    assert not (site / "research").exists()  # the studies' records stay beside benchmarks/
    trainer_api = (site / "api" / "trainer" / "index.html").read_text()
    assert "DiffusionSDPOTrainer" in trainer_api and "create_model_card" in trainer_api
    config_api = (site / "api" / "config" / "index.html").read_text()
    assert "<li><strong>safeguard_mu</strong>" in config_api  # HF parameter lists as list items, not run together
    for page in sorted((site / "api").glob("*/index.html")):
        html = page.read_text()
        raw = re.findall(r":(?:class|func|meth|mod|attr|data|exc):`[^`]*`|\[`~?[\w.]+`\]", html)
        assert not raw, f"{page.parent.name}: raw roles {raw[:5]}"
    pages = {
        name: (site / "api" / name / "index.html").read_text() for name in ("families", "data", "cli", "evaluation")
    }
    assert "StableDiffusion3Family" in pages["families"] and "FluxFamily" in pages["families"]
    assert "build_sharded_latent_cache" in pages["data"] and "load_sharded_latent_cache" in pages["data"]
    assert "run_cache" in pages["cli"] and "CacheArguments" in pages["cli"]
    assert "register_scorer" in pages["evaluation"] and "available_scorers" in pages["evaluation"]


# -- keeping the docs true --------------------------------------------------------------------------------------------

# The README, the site's pages and the studies' records beside benchmarks/ (read in the repository, not built)
PAGES = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").rglob("*.md")),
    *sorted((ROOT / "benchmarks" / "research").glob("*.md")),
]
# A measured figure: a time, a size, a cost or a speed ratio (1.30x). Percentages, counts and settings are left out.
FIGURE = re.compile(
    r"(?<![\w.-])(?:\$\d[\d,.]*|\d+\.\d+x|\d[\d,]*(?:\.\d+)? ?(?:ms|s|min|minutes|h|hours|MB|GB|TB|MiB|GiB)(?!\w))"
)
TEST_FILE = re.compile(r"(?:(?:benchmarks|rewards)/)?tests/(?:\w+/)?test_\w+\.py")
NO_FILE = re.compile(r"\b(?:not recorded|arithmetic|computed)\b", re.IGNORECASE)


def _sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) per Markdown section, fenced code and inline code left out (commands and formulas)."""
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    text = re.sub(r"^\n((?: {4}.*\n)+)", "\n", text, flags=re.MULTILINE)  # indented code blocks
    # inline code goes too, but for the sources it names (result files, tests)
    text = re.sub(
        r"`[^`\n]*`",
        lambda m: m.group(0) if re.search(r"\.json`|^`(?:benchmarks/)?tests/", m.group(0)) else "``",
        text,
    )
    parts = re.split(r"^(#{1,6} .*)$", text, flags=re.MULTILINE)
    return [("(top)", parts[0])] + list(zip(parts[1::2], parts[2::2]))


def _result_file_exists(name: str) -> bool:
    """A path from the repository root or the docs folder, or a bare name of a file in ``benchmarks/results/`` or one
    of its folders (a study's, or ``history/``: superseded runs the docs still quote)."""
    name = name.lstrip("./")
    results = ROOT / "benchmarks" / "results"
    base = os.path.basename(name)
    candidates = [ROOT / name, ROOT / "docs" / name, results / base, *(folder / base for folder in result_folders())]
    return any(path.is_file() for candidate in candidates for path in candidate.parent.glob(candidate.name))


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_quoted_figure_names_where_it_comes_from(page: Path) -> None:
    """A section that quotes a time, a size, a cost or a speed ratio names its result file or test (or says the
    figure is computed or not recorded), and every result file and test a page names exists."""
    text = page.read_text()
    unsourced = []
    for heading, body in _sections(text):
        figures = FIGURE.findall(body)
        named = [n for found in RESULT_FILE.findall(body) for n in _expand(found) if _result_file_exists(n)]
        if figures and not (named or TEST_FILE.search(body) or NO_FILE.search(body)):
            unsourced.append(f"{heading.strip()}: {figures[:4]}")
    assert not unsourced, f"{page.name}: figures without a source: {unsourced}"
    for found in RESULT_FILE.findall(text):
        # result files: paths under results/ or images/, or kebab-case names (the outputs that commands write,
        # trainer_state.json and the like, are named in prose too)
        if "results/" in found or "images/" in found or ("/" not in found and "-" in found):
            for name in _expand(found):
                assert _result_file_exists(name), f"{page.name} names {name}, which does not exist"
    for name in TEST_FILE.findall(text):
        assert (ROOT / name).is_file(), f"{page.name} names {name}, which does not exist"


def test_the_shipped_demo_base_has_the_size_the_docs_quote() -> None:
    base = ROOT / "trl_diffusion_sdpo" / "demo" / "base"
    size_mb = sum(f.stat().st_size for f in base.rglob("*") if f.is_file()) / 1e6
    for page in (ROOT / "README.md", ROOT / "docs" / "demo.md"):
        assert f"{size_mb:.1f} MB" in page.read_text(), page.name


def test_the_api_pages_render_the_docstrings_roles_and_parameter_lists(tmp_path) -> None:
    """No Sphinx role or Hugging Face link shows as raw text, and the config's parameters are list items."""
    pytest.importorskip("mkdocstrings_handlers.python")
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        from _griffe_docstrings import rewrite_docstring
    finally:
        sys.path.remove(str(ROOT / "docs"))
    text = (
        "See :class:`~trl_diffusion_sdpo.DiffusionSDPOConfig` and :mod:`.data.latent_cache`, or [`~transformers.X`].\n"
        "\n> Parameters that control the objective\n\nbeta (`float`, *optional*, defaults to `5000.0`):\n"
        "    KL strength.\n    Second line.\nmapo_beta (`float`), mapo_snr_value (`float`,\n    *optional*):\n"
        "    MaPO's.\n"
    )
    rendered = rewrite_docstring(text, "trl_diffusion_sdpo")
    assert (
        '<autoref identifier="trl_diffusion_sdpo.DiffusionSDPOConfig" optional><code>DiffusionSDPOConfig</code>'
        in rendered
    )
    assert (
        'identifier="trl_diffusion_sdpo.data.latent_cache"' in rendered and 'identifier="transformers.X"' in rendered
    )
    assert "**Parameters that control the objective**" in rendered
    assert "- **beta** (`float`, *optional*, defaults to `5000.0`):\n  KL strength.\n  Second line." in rendered
    assert "- **mapo_beta** (`float`), mapo_snr_value (`float`, *optional*):\n  MaPO's." in rendered


# Where a command line starts: the console script, ``python -m trl_diffusion_sdpo`` (also under accelerate launch) and
# examples/train_flow.py, the train command under another name (the TRL-shaped example scripts' own arguments are
# tested with them, tests/docs/test_examples.py).
COMMAND = re.compile(
    r"(?:trl-diffusion-sdpo|-m trl_diffusion_sdpo|python -m trl_diffusion_sdpo)\s+"
    r"(train|cache|evaluate|demo|export|pairs|reward-server)(?![\w-])"
    r"|(?:examples/train_flow\.py)()"
)


def _command_lines(text: str) -> list[str]:
    """Every command line in fenced code (continuation lines joined) and in inline code."""
    lines = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.DOTALL):
        lines += block.replace("\\\n", " ").splitlines()
    lines += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.DOTALL))
    return lines


def _help(command: str, capsys) -> str:
    """Every option ``command`` lists: its ``--help_all`` where it has one (train's parser), else its ``--help``."""
    from trl_diffusion_sdpo.cli.main import main

    with pytest.raises(SystemExit):
        main([command, "--help_all" if command in ("train", "cache") else "--help"])
    return capsys.readouterr().out


def test_every_command_and_flag_the_docs_name_exists(capsys) -> None:
    commands = ("train", "cache", "evaluate", "demo", "export", "pairs", "reward-server")
    helps = {command: _help(command, capsys) for command in commands}
    missing = []
    for page in PAGES:
        for line in _command_lines(page.read_text()):
            for match in COMMAND.finditer(line):
                command = match.group(1) or "train"
                rest = re.split(r"&&|\||;|#", line[match.end() :])[0]
                for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest):
                    if flag == "--config" and command in ("train", "cache"):
                        flag = "--config FILE.yaml"
                    if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helps[command]):
                        missing.append(f"{page.name}: {command} {flag}")
    assert not missing, missing


# The pages that name the package's modules and the repository's files: the site's, the README and CONTRIBUTING.md
# (whose recipes tell a contributor which files and functions to edit).
NAMING_PAGES = [*PAGES, ROOT / "CONTRIBUTING.md"]
# A repository path in inline code: benchmarks/..., examples/..., tests/..., docs/..., trl_diffusion_sdpo/...
REPO_PATH = re.compile(r"(?<![\w/.-])((?:benchmarks|examples|tests|docs|rewards|trl_diffusion_sdpo)/[\w./{},*<>-]*)")


def _code(text: str) -> list[tuple[int, str]]:
    """(line number, code) of every line of a fenced block and every inline code span outside them."""
    spans, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced:
            spans.append((number, line))
        else:
            spans += [(number, code) for code in re.findall(r"`([^`]+)`", line)]
    return spans


def _resolves(dotted: str) -> bool:
    """``trl_diffusion_sdpo.a.b.C.d``: the longest importable module prefix, then attributes."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_every_module_name_and_repository_path_the_docs_give_exists() -> None:
    """Every ``trl_diffusion_sdpo.x.y`` in code (fenced or inline) imports (module, then attributes), and every
    repository path in code exists (``{a,b}`` alternatives and ``*`` globbed; a ``<placeholder>`` part, as in a
    how-to, is left out, and ``examples/dreambooth/`` is diffusers' folder, which the family pages cite)."""
    missing = []
    for page in NAMING_PAGES:
        for line, code in _code(page.read_text()):
            for dotted in re.findall(r"\btrl_diffusion_sdpo(?:\.\w+)+", code):
                if not _resolves(dotted):
                    missing.append(f"{page.name}:{line}: {dotted}")
            for path in REPO_PATH.findall(code):
                path = path.rstrip(".,")
                if "<" in path or path.startswith("examples/dreambooth/"):
                    continue
                if not any(list(ROOT.glob(name)) for name in _expand(path)):
                    missing.append(f"{page.name}:{line}: {path}")
    assert not missing, missing


def test_the_config_docstring_states_each_fields_default() -> None:
    """Each ``name (`type`, *optional*, defaults to `value`)`` of :class:`DiffusionSDPOConfig`'s docstring (the API
    page shows it) is the dataclass field's default (the value itself for an enum: ``lr_scheduler_type``);
    ``a, b (defaults to `x`, `y`)`` pairs them in order, one value for several names applies to each."""
    import ast
    import dataclasses

    from trl_diffusion_sdpo import DiffusionSDPOConfig

    fields = {f.name: f for f in dataclasses.fields(DiffusionSDPOConfig)}
    doc = " ".join(DiffusionSDPOConfig.__doc__.split())
    entries = re.findall(
        r"(\w+(?:, \w+)*) \((?:`[^`]*`(?: or `[^`]*`)?, (?:\*optional\*, )?)?defaults to ((?:`[^`]*`(?:, )?)+)\)", doc
    )
    assert len(entries) == doc.count("defaults to"), "a stated default this test does not read"
    wrong = []
    for names, values in entries:
        names, values = names.split(", "), re.findall(r"`([^`]*)`", values)
        assert len(values) in (1, len(names)), (names, values)
        for name, text in zip(names, values * len(names) if len(values) == 1 else values):
            field = fields[name]
            default = field.default_factory() if field.default is dataclasses.MISSING else field.default
            if ast.literal_eval(text) != getattr(default, "value", default):
                wrong.append(f"{name}: docstring {text}, field {default!r}")
    assert not wrong, wrong


def test_every_link_of_the_readme_resolves() -> None:
    """The README is not part of the site (whose links ``mkdocs build --strict`` checks): its own relative links."""
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    assert links
    for link in links:
        if link.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.exists(), f"README links to {link}, which does not exist"
        if anchor and target.suffix == ".md":
            headings = [
                re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.*)$", target.read_text(), flags=re.MULTILINE)
            ]
            assert anchor in headings, f"README links to {link}: no such heading"


def test_the_sdxl_recipe_table_is_what_sdxl_full_yaml_holds_but_the_two_named_settings() -> None:
    """docs/sdxl.md's table of the authors' recipe against examples/configs/sdxl_full.yaml: every ``field=value`` of
    its last column is the parsed config's value, except ``independent_augmentation`` and ``fixed_time_ids``, the two
    the page says the file leaves at our defaults."""
    import ast

    from trl_diffusion_sdpo.cli.train import parse_args

    page = (ROOT / "docs" / "sdxl.md").read_text()
    table = page.split("## Full tuning with the authors' SDXL recipe", 1)[1].split("\n\n", 2)[1]
    settings = dict(re.findall(r"`(\w+)=([^`]+)`", table))
    assert len(settings) >= 12, settings
    _, config, _, _ = parse_args(["--config", str(ROOT / "examples" / "configs" / "sdxl_full.yaml"), "--use_cpu"])
    differ = {}
    for name, text in settings.items():
        value = ast.literal_eval(text)
        actual = getattr(config, name)
        actual = getattr(actual, "value", actual)  # enums (optim, lr_scheduler_type)
        if actual != value:
            differ[name] = (value, actual)
    assert differ == {"independent_augmentation": (True, False), "fixed_time_ids": (True, False)}


def _engines_table() -> dict[str, list[str]]:
    """The rows of docs/safeguard.md#engines's table: engine -> its cells for the output, parameter, update spaces."""
    page = (ROOT / "docs" / "safeguard.md").read_text()
    section = page.split("{#engines}", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("|")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[2:]}


def _engine(cls: type, **attributes) -> object:
    """An engine without an accelerator: the checks below read only the class and ``attributes``."""
    engine = cls.__new__(cls)
    engine.__dict__.update(attributes)
    return engine


def _refuses(check, *args) -> bool:
    try:
        check(*args)
    except ValueError:
        return True
    return False


def test_where_the_exact_safeguard_runs_is_what_the_engines_allow() -> None:
    """docs/safeguard.md#engines's table against the engines' own checks: "refused" exactly where
    ``check_parameter_space`` / ``check_update_space`` raise (the per-pair scope, and the update space where it needs
    it, also where the one pass cannot run), ``safeguard_scope="global"`` where only the global scope is allowed,
    "one pass" / "per-branch passes" as ``one_pass_reason`` says; no page says it otherwise."""
    from trl_diffusion_sdpo.engines.deepspeed import DeepSpeedEngine
    from trl_diffusion_sdpo.engines.fsdp import FSDP1Engine, FSDP2Engine
    from trl_diffusion_sdpo.engines.plain import PlainEngine
    from trl_diffusion_sdpo.safeguards.gradients import collectives_for

    def of(cls: type, **attributes):  # what the exact safeguard asks of an engine: its collectives
        return collectives_for(_engine(cls, **attributes))

    engines = {
        "one process, DDP": [of(PlainEngine)],
        "DeepSpeed ZeRO-1/2": [of(DeepSpeedEngine, stage=1), of(DeepSpeedEngine, stage=2)],
        "DeepSpeed ZeRO-3": [of(DeepSpeedEngine, stage=3)],
        "FSDP2": [of(FSDP2Engine)],
        "FSDP1": [of(FSDP1Engine)],
    }
    table = _engines_table()
    assert set(table) == set(engines), sorted(table)
    wrong = []
    for name, instances in engines.items():
        output, parameter, pair, update = table[name]
        for engine in instances:
            refused = {scope: _refuses(engine.check_parameter_space, scope) for scope in ("local", "global")}
            if output != "yes":
                wrong.append(f"{name}: output space is allowed everywhere, the table says {output!r}")
            if ("refused" in parameter) != all(refused.values()):
                wrong.append(f"{name}: parameter space refused={refused}, the table says {parameter!r}")
            elif not all(refused.values()):
                global_only = refused["local"] and not refused["global"]
                if global_only != ('safeguard_scope="global"' in parameter):
                    wrong.append(f"{name}: parameter space refused={refused}, the table says {parameter!r}")
                if (engine.one_pass_reason() is None) != ("one pass" in parameter):
                    wrong.append(f"{name}: one_pass_reason={engine.one_pass_reason()!r}, the table says {parameter!r}")
            one_pass = engine.one_pass_reason() is None
            if ("refused" in pair) != (_refuses(engine.check_parameter_space, "pair") or not one_pass):
                wrong.append(f"{name}: the per-pair scope, the table says {pair!r}")
            update_refused = _refuses(engine.check_update_space) or not (one_pass or engine.two_pass_update_space)
            if ("refused" in update) != update_refused:
                wrong.append(f"{name}: update space, the table says {update!r}")
            elif not update_refused and one_pass != ("one pass" in update):
                wrong.append(f"{name}: update space in one pass={one_pass}, the table says {update!r}")
    assert not wrong, wrong
    from trl_diffusion_sdpo import DiffusionSDPOConfig

    stale = re.compile(r"DDP only|refused under DeepSpeed(?! ZeRO-3)|not available under DeepSpeed", re.IGNORECASE)
    for page in PAGES:
        assert not stale.search(page.read_text()), page.name
    assert not stale.search(" ".join(DiffusionSDPOConfig.__doc__.split()))


def test_the_safeguard_recommendation_is_the_comparisons_and_the_same_in_readme_docs_and_demo() -> None:
    """The README, docs/safeguard.md and the demo (which quotes ``safeguard_recommendation.json``) state the same
    recommendation, and every row of its table is the paired comparison's result file's number."""
    import json

    from trl_diffusion_sdpo.demo.report import RECOMMENDATION_FILE

    shipped = json.loads(RECOMMENDATION_FILE.read_text())
    comparison = json.loads((ROOT / shipped["source"]).read_text())
    assert shipped["rows"], (
        "the recommendation has no rows: regenerate it with benchmarks/studies/safeguard_comparison.py"
    )
    # the README carries the short form with a link here (tests/docs/test_readme.py checks its block)
    pages = {name: " ".join((ROOT / name).read_text().split()) for name in ("docs/safeguard.md",)}
    for name, text in pages.items():
        assert " ".join(shipped["text"].split()) in text, f"{name} does not state the shipped recommendation"
        assert shipped["source"] in text, name
    block = (
        pages["docs/safeguard.md"].split("<!-- recommendation:start -->", 1)[1].split("<!-- recommendation:end -->")[0]
    )
    assert " ".join(shipped["text"].split()) in block, "docs/safeguard.md states it outside its generated block"
    for row in shipped["rows"]:
        setting = next(
            s
            for s in comparison["settings"].values()
            if s["learning_rate"] == row["learning_rate"] and s["steps"] == row["run_steps"]
        )
        found = setting["methods"][row["method"]]["reward_minus_dpo_by_step"][str(row["step"])]
        assert found["mean"] == row["reward_minus_dpo"]["mean"] and found["ci95"] == row["reward_minus_dpo"]["ci95"]
        cell = "{:+.3f} [{:+.3f}, {:+.3f}]".format(found["mean"], *found["ci95"])
        for name, text in pages.items():
            assert cell in text, f"{name} lacks {row['setting']} {row['label']}: {cell}"


# -- links and the nav, without mkdocs --------------------------------------------------------------------------------

DOCS = ROOT / "docs"


def _slug(heading: str) -> str:
    """Python-Markdown's toc slug (mkdocs' default): ASCII, word characters, spaces and hyphens, lower case, runs of
    spaces and hyphens joined into one hyphen."""
    import unicodedata

    text = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _without_fences(text: str) -> str:
    """The Markdown without its fenced blocks (a heading or link in a code block is not one)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)


def _without_code(text: str) -> str:
    """The Markdown without fenced blocks and inline code."""
    return re.sub(r"`[^`\n]*`", "", _without_fences(text))


def _anchors(page: Path) -> set[str]:
    """Every anchor a page's headings give: ``{#id}`` where set, else the heading's slug."""
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.*)$", _without_fences(page.read_text()), flags=re.MULTILINE):
        explicit = re.search(r"\{#([\w-]+)\}\s*$", heading)
        anchors.add(explicit.group(1) if explicit else _slug(heading))
    return anchors


def _broken_links(page: Path) -> list[str]:
    """Relative links of ``page`` whose file does not exist or whose anchor no heading of the target gives."""
    broken = []
    for link in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", _without_code(page.read_text())):
        if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link} (no such file)")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"{link} (no such heading)")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_resolves(page: Path) -> None:
    """Every relative link of the README and of every docs page names a file that exists and, for a page, an anchor
    one of its headings gives (checked here without mkdocs, whose strict build checks the site's links too)."""
    assert not _broken_links(page), f"{page.relative_to(ROOT)}: {_broken_links(page)}"


def test_the_link_check_finds_a_missing_page_and_a_missing_heading(tmp_path) -> None:
    (tmp_path / "other.md").write_text(
        '# Other\n\n## A heading {#custom}\n\n## Plain heading, with a comma\n\n## Noising (`noising="x"`)\n'
        "```\n# not a heading\n```\n"
    )
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#custom) [ok](other.md#plain-heading-with-a-comma) [ok](#top) [web](https://x.org/a#b)\n"
        "[ok](other.md#noising-noisingx) [bad](missing.md) [bad](other.md#a-heading) `[code](missing.md)`\n"
        "[bad](other.md#not-a-heading)\n\n# Top\n"
    )
    assert _broken_links(page) == [
        "missing.md (no such file)",
        "other.md#a-heading (no such heading)",
        "other.md#not-a-heading (no such heading)",
    ]


def _nav_pages(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in _nav_pages(value)]
    return [page for item in nav for page in _nav_pages(item)]


def test_the_mkdocs_nav_lists_every_page() -> None:
    """The site is for users: the nav lists every page under docs/, and no page is built outside it."""
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    listed = _nav_pages(config["nav"])
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert "not_in_nav" not in config
    assert sorted(pages - set(listed)) == [], "pages missing from mkdocs.yml's nav"
    assert sorted(set(listed) - pages) == [], "the nav lists pages that do not exist"


# the page, and what follows a section mark (read, not consumed: the next citation may stand in it)
RECORD_CITATION = re.compile(r"`benchmarks/research/([\w-]+\.md)`(?: § (?=(.{1,200})))?")


def _headings(page: Path) -> list[str]:
    """A record page's headings as the docs cite them: no Markdown ticks, no ``{#anchor}``."""
    found = re.findall(r"^#+ (.+?)\s*(?:\{#[\w-]+\})?\s*$", page.read_text(encoding="utf-8"), flags=re.M)
    return [heading.replace("`", "") for heading in found]


def test_every_citation_of_the_studies_records_names_a_page_and_a_heading_they_hold() -> None:
    """Where a page's advice rests on a study, it cites the record beside benchmarks/ as
    ``benchmarks/research/PAGE.md`` and, for a section, ``§ HEADING``: each page exists and each heading is one of
    its headings (a renamed heading or a moved page fails here)."""
    records = ROOT / "benchmarks" / "research"
    cited = 0
    for doc in sorted(DOCS.rglob("*.md")):
        text = " ".join(doc.read_text(encoding="utf-8").split())  # a citation may wrap
        for page, after in RECORD_CITATION.findall(text):
            assert (records / page).is_file(), f"{doc.name}: benchmarks/research/{page}"
            if after:
                assert any(after.startswith(h) for h in _headings(records / page)), f"{doc.name}: {page} § {after}"
            cited += 1
    assert cited > 40


# -- the docs speak of the project, not of how the work on it was organised ------------------------------------------

# Sentences about the work rather than the project: tracker numbers, work units, who else used the machine, which
# machine was or was not available. Each pattern is narrow enough that the technical words it shares stay free:
# "another process" (a process of a distributed run), "helpers" (diffusers' helper functions), "on-policy rounds".
WORK_ACCOUNT = re.compile(
    r"\bissues? \d+|\btasks? \d+|\b(?:this|last|previous) round\b|\bround before\b|\bsessions?\b"
    r"|\bwas (?:not )?lent\b|\blent (?:to|for)\b|\bno GPU (?:was|were) (?:available|lent|used)\b"
    r"|\bGPU was (?:not )?(?:available|lent)\b|\bmachine was (?:busy|not quiet|shared)\b"
    r"|\banother (?:job|process|agent|helper) (?:was )?running\b|\bother (?:jobs|agents|helpers)\b|\bagents?\b"
    r"|\b(?:another|documentation) helper\b|\bwhen this (?:family|feature) was added\b",
    re.IGNORECASE,
)
# A result file's name is an identifier its script writes and tests read, not a sentence: left out of the check. A
# name is matched from the start of its run of name characters only (the lookbehind; a match from inside the run
# would be part of the same longest name), so a result file's long line of numbers is scanned once, not once per
# character.
FILE_NAME = re.compile(r"(?<![\w{},*./-])[\w{},*./-]+\.(?:json|png|csv)\b")
PACKAGE = ROOT / "trl_diffusion_sdpo"
PACKAGE_TEXT = sorted(
    p for p in PACKAGE.rglob("*") if p.is_file() and p.suffix in (".py", ".md", ".json", ".txt", ".yaml", ".yml")
)
# The rest of what the project ships: its changelog and guide, its tests (this file, which plants such sentences, left
# out) and its benchmarks with their result files.
PROJECT_TEXT = sorted(
    [ROOT / "CHANGELOG.md", ROOT / "CONTRIBUTING.md"]
    + [p for p in (ROOT / "tests").rglob("*.py") if p.resolve() != Path(__file__).resolve()]
    + [p for p in (ROOT / "benchmarks").rglob("*") if p.is_file() and p.suffix in (".py", ".md", ".json")]
)


def _work_accounts(text: str) -> list[str]:
    """Each line of ``text`` that tells how the work was organised (file names left out)."""
    return [line.strip()[:160] for line in text.splitlines() if WORK_ACCOUNT.search(FILE_NAME.sub("", line))]


@pytest.mark.parametrize(
    "path",
    [*PAGES, *PACKAGE_TEXT, *PROJECT_TEXT],
    ids=[str(p.relative_to(ROOT)) for p in [*PAGES, *PACKAGE_TEXT, *PROJECT_TEXT]],
)
def test_no_account_of_how_the_work_was_organised(path: Path) -> None:
    """The README, the docs and the package's strings (messages, docstrings, shipped data) speak of the project: no
    issue or task number, session, round of work, lent or busy machine, other jobs or agents."""
    found = _work_accounts(path.read_text(errors="replace"))
    assert not found, f"{path.relative_to(ROOT)}: {found}"


@pytest.mark.parametrize(
    "sentence",
    [
        "Measured before and after issue 21 on the 2-core machine.",
        "This round the update space got faster than in the last round.",
        "Not measured: no GPU was lent to this work.",
        "No GPU was available for this work.",
        "The GPU was not available, so the H100 rows are missing.",
        "The figures of the last session are kept for comparison.",
        "The machine was busy, so wall times are noisy.",
        "Another job was running beside it (load average 6).",
        "The CPU was shared with four other agents' jobs.",
        "What task 7 asked: every method at three learning rates.",
        "A documentation helper edited files beside it.",
        "Unmeasured at real scale: nothing ran when this family was added.",
    ],
)
def test_the_work_account_check_finds_a_planted_sentence(sentence: str) -> None:
    assert _work_accounts(f"A line about the trainer.\n{sentence}\n") == [sentence]


@pytest.mark.parametrize(
    "sentence",
    [
        "A preemption signal on another process stops both after the same step.",
        "How `s` is drawn follows diffusers' own helpers.",
        "Pass the next round's base to `trl-diffusion-sdpo pairs` for on-policy rounds.",
        "Results: `benchmarks/results/cpu-structure-small-2pairs-session-abba.json`.",
        "An open ComfyUI issue (Comfy-Org/ComfyUI #11926) reports the missing key names.",
        "Both safeguard spaces train on the task of instruction editing.",
    ],
)
def test_the_work_account_check_leaves_technical_uses(sentence: str) -> None:
    assert _work_accounts(sentence) == []
