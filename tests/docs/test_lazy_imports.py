"""A module imports at its top what it always uses. An import of the package inside a function is the exception, and
says why on its line or on the comment line above it: it loads an optional part only when chosen (an extra, a
command's heavy module), keeps a light import light (``import trl_diffusion_sdpo``, ``--help``), or defers a cycle.
So an always-used import moved into a function without a word fails here.

The imports walked are those ``benchmarks/tools/loaded_modules.py`` counts: ``import`` and ``from ... import``
statements inside a function body (nested functions included) naming this package, relatively or absolutely.
Optional parts that a registry names (families, objectives, engines, scorers, collectives) load through it
(``config._lazy.import_target``, a package's lazy names) and need no import statement in a function at all.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

from tests.helpers.layering import PACKAGE, ROOT
from tests.helpers.source_scans import parsed

# Comment directives for tools, which say nothing of why an import is lazy.
DIRECTIVES = re.compile(
    r"\b(noqa\b(:\s*[A-Z]+[0-9]+(,\s*[A-Z]+[0-9]+)*)?|type:\s*ignore(\[[^\]]*\])?|pragma:.*|fmt:.*)"
)
# The fewest words a reason takes ("# lazy" alone says nothing).
REASON_WORDS = 3


def function_level_package_imports(source: str) -> list[ast.Import | ast.ImportFrom]:
    """The statements of ``source`` that import this package inside a function body (nested ones included)."""
    found: dict[int, ast.Import | ast.ImportFrom] = {}
    for function in ast.walk(parsed(source)):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.ImportFrom):
                internal = node.level > 0 or (node.module or "").split(".")[0] == PACKAGE
            elif isinstance(node, ast.Import):
                internal = any(alias.name.split(".")[0] == PACKAGE for alias in node.names)
            else:
                continue
            if internal:
                found[id(node)] = node
    return sorted(found.values(), key=lambda node: node.lineno)


def comments_by_line(source: str) -> tuple[dict[int, str], set[int]]:
    """Each line's comment text (tokenized: a ``#`` inside a string is none), and the lines holding a comment only."""
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
        elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(token.start[0], token.end[0] + 1))
    return comments, set(comments) - code_lines


def lazy_reason(node: ast.Import | ast.ImportFrom, comments: dict[int, str], comment_only: set[int]) -> str:
    """The comment saying why ``node`` is lazy: on one of its lines, or on a comment line right above it; tools'
    directives (``noqa``, ``type: ignore``) left out. Empty where there is none of at least :data:`REASON_WORDS`
    words."""
    lines = [line for line in range(node.lineno, (node.end_lineno or node.lineno) + 1) if line in comments]
    if node.lineno - 1 in comment_only:
        lines.insert(0, node.lineno - 1)
    for line in lines:
        text = DIRECTIVES.sub("", comments[line]).strip(" ,;-")
        if len(re.findall(r"[A-Za-z`'][\w`'.-]*", text)) >= REASON_WORDS:
            return text
    return ""


def unexplained_imports(root: Path) -> list[str]:
    """``path:line`` of every function-level package import under ``root`` without a reason."""
    found = []
    for path in sorted(root.rglob("*.py")):
        source = path.read_text()
        comments, comment_only = comments_by_line(source)
        for node in function_level_package_imports(source):
            if not lazy_reason(node, comments, comment_only):
                found.append(f"{path.relative_to(root.parent).as_posix()}:{node.lineno}")
    return found


WALKED = """
import os
from typing import TYPE_CHECKING

from .base import Family  # a top-level import: not counted

if TYPE_CHECKING:
    from .heavy import Heavy


def bare():
    from .base import thing

    import torch  # a library, not the package: not counted


def explained():
    # lazy: the plots extra (matplotlib) is optional
    from ..demo.plots import plot


def trailing():
    from trl_diffusion_sdpo.families import (  # lazy: a family loads only when chosen
        sd,
    )


def directive_only():
    from . import x  # noqa: F401


def code_comment_above():
    if os.environ:  # a comment about this condition, not the import
        import trl_diffusion_sdpo.io.hub


def string_above():
    text = "# lazy: a reason written in a string"
    from ..config import y


def too_short():
    from .. import z  # lazy


class Holder:
    def method(self):
        def nested():
            import trl_diffusion_sdpo  # the root loads the config alone

        from . import w
"""


def test_the_walk_finds_function_level_package_imports_and_reads_their_reasons(tmp_path):
    package = tmp_path / PACKAGE
    package.mkdir()
    (package / "walked.py").write_text(WALKED)
    lines = WALKED.splitlines()
    line_of = {node.lineno: lines[node.lineno - 1].strip() for node in function_level_package_imports(WALKED)}
    assert sorted(line_of.values()) == sorted(
        [
            "from .base import thing",
            "from ..demo.plots import plot",
            "from trl_diffusion_sdpo.families import (  # lazy: a family loads only when chosen",
            "from . import x  # noqa: F401",
            "import trl_diffusion_sdpo.io.hub",
            "from ..config import y",
            "from .. import z  # lazy",
            "import trl_diffusion_sdpo  # the root loads the config alone",
            "from . import w",
        ]
    )
    unexplained = {lines[int(entry.rpartition(":")[2]) - 1].strip() for entry in unexplained_imports(package)}
    assert unexplained == {
        "from .base import thing",
        "from . import x  # noqa: F401",
        "import trl_diffusion_sdpo.io.hub",
        "from ..config import y",
        "from .. import z  # lazy",
        "from . import w",
    }


def test_every_function_level_import_of_the_package_says_why_it_is_lazy():
    unexplained = unexplained_imports(ROOT)
    assert not unexplained, (
        "import at the module's top what it always uses; an import kept inside a function says why on its line or "
        "the comment line above (an optional part, a light import kept light, a cycle):\n" + "\n".join(unexplained)
    )
