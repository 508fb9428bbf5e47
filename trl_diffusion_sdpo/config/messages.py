"""How the package words what a user must change, in one place for every layer: advice in the words the user typed
(flags on the command line, keyword arguments from Python), the closest known name to a misspelt one, and the refusal
to replace files a command did not write in this run.

The command line sets the switch (:func:`command_line`, which ``cli.console.run_command`` enters) so that a message
raised anywhere below, a data reader's as much as the trainer's, names ``--dataset_columns trl`` where a Python user
reads ``dataset_columns='trl'``.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator, Sequence

__all__ = [
    "OVERWRITE_FLAG",
    "OVERWRITE_OPTION",
    "OutputExistsError",
    "advice",
    "command_line",
    "did_you_mean",
    "file_syntax_error",
    "listed",
    "overwrite_advice",
    "replacing_refusal",
]

# Whether the command line runs (set by command_line): advice then names flags, from Python the keyword arguments.
_on_command_line = False
# Names a refusal lists before it counts the rest: one line stays readable whatever a folder holds.
LISTED_NAMES = 6
# The one switch, on every command that writes and in every function behind one, that lets it replace what an earlier
# run left in its output: the keyword (``overwrite=True``; the trainer's ``train(overwrite=True)``) and the flag.
OVERWRITE_OPTION = "overwrite"
OVERWRITE_FLAG = f"--{OVERWRITE_OPTION}"


class OutputExistsError(FileExistsError):
    """A command was pointed at a file or folder holding what it did not write in this run, which it would replace
    (another run's checkpoints, an earlier export, evaluation or cache, or anything else)."""


@contextlib.contextmanager
def command_line() -> Iterator[None]:
    """While inside, :func:`advice` names flags: the command line's entry point runs its command in here."""
    global _on_command_line
    before, _on_command_line = _on_command_line, True
    try:
        yield
    finally:
        _on_command_line = before


def advice(flag: str, python: str) -> str:
    """``flag`` (the command line's words) when the command line runs, ``python`` (the keyword arguments) from
    Python: an error a user fixes names what they typed."""
    return flag if _on_command_line else python


def overwrite_advice(call: str = "") -> str:
    """The switch that lets a command replace an earlier run's output, as the user gives it: :data:`OVERWRITE_FLAG`
    on the command line, ``overwrite=True`` from Python (``call(overwrite=True)`` where the keyword belongs to the
    method ``call``, e.g. ``train``)."""
    keyword = f"{OVERWRITE_OPTION}=True"
    return advice(OVERWRITE_FLAG, f"{call}({keyword})" if call else keyword)


def did_you_mean(name: str, known: Sequence[str], prefix: str = "--") -> str:
    """`` (did you mean --x?)`` with the known name closest to ``name`` (``difflib``), or ``""``: the flags' and the
    registries' (scorers, reward functions) suggestion alike."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def file_syntax_error(path: str, error: Exception, what: str = "", line: int | None = None) -> str:
    """The one wording of a file that does not parse: ``what path:line:column: not valid YAML: problem``, from a
    PyYAML error (its ``problem_mark``, 0-based) or a ``json.JSONDecodeError`` (1-based ``lineno``, ``colno``), the
    location an editor jumps to; ``what``: the flag that named the file (``--config``); ``line``: the file's line
    that was parsed alone (a JSON Lines record), whose error counts from 1 within it."""
    prefix = f"{what} " if what else ""
    if isinstance(error, ValueError) and hasattr(error, "lineno"):  # json.JSONDecodeError
        at = f"{error.lineno if line is None else line + error.lineno - 1}:{error.colno}"
        return f"{prefix}{path}:{at}: not valid JSON: {error.msg}"
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or " ".join(str(error).split())
    if mark is None:
        return f"{prefix}{path}: not valid YAML: {problem}"
    context, start = getattr(error, "context", None), getattr(error, "context_mark", None)
    # an unclosed quote or bracket is found where the file ends: say where it opened
    opened = f" ({context} at {start.line + 1}:{start.column + 1})" if context and start is not None else ""
    return f"{prefix}{path}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {problem}{opened}"


def listed(names: Sequence[str]) -> str:
    """``a, b, c`` with at most :data:`LISTED_NAMES` names and the count of the rest."""
    shown = ", ".join(names[:LISTED_NAMES])
    return shown + (f" and {len(names) - LISTED_NAMES} more" if len(names) > LISTED_NAMES else "")


def replacing_refusal(path: str, writer: str, ways: Sequence[str], held: str = "", found: Sequence[str] = ()) -> str:
    """The one wording of every refusal to replace what a command did not write in this run: ``path`` (a file that
    exists, or a folder holding ``held`` or the entries ``found``), what ``writer`` would replace, and the ``ways``
    out (the flag that allows it first, named through :func:`advice` by the caller), e.g.
    ``out holds another run's files (unet), which a new run would replace. Continue that run with ..., pass
    --overwrite to replace it, or write this one into a new --output_dir.``"""
    if held:
        what = f"holds {held}" + (f" ({listed(found)})" if found else "")
    else:
        what = f"holds {listed(found)}" if found else "already exists"
    choices = ", ".join(ways[:-1]) + (", or " if len(ways) > 1 else "") + ways[-1]
    return f"{path} {what}, which {writer} would replace. {choices[:1].upper()}{choices[1:]}."
