"""A griffe extension for the API pages (``mkdocs.yml``: ``extensions``): renders the docstrings as they are written.

The package's docstrings use two conventions the site's Google-style parser does not know:

- Sphinx roles, ``:class:`~trl_diffusion_sdpo.DiffusionSDPOConfig``` or ``:func:`.hub.build_model_card``` (relative to
  the object's package), and Hugging Face links, ``[`~transformers.TrainingArguments`]``: each becomes inline code
  linked to the object's API entry when the site documents it (an *optional* autorefs link: plain code otherwise);
- Hugging Face parameter lists, as in ``DiffusionSDPOConfig``: ``> Parameters that control X`` headings and
  ``name (`type`, *optional*, defaults to `v`):`` entries with an indented description, which Markdown would run
  together into one paragraph: each becomes a bold heading and a list item.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

import griffe

__all__ = ["HFStyleDocstrings", "rewrite_docstring"]

# :class:`target`, :func:`~a.b`, :meth:`Title <a.b>`, with an optional py: domain.
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):`(?P<body>[^`]+)`")
# [`~transformers.TrainingArguments`] not followed by a link target ([..](url) or [..][id]).
_HF_LINK = re.compile(r"\[`(?P<body>~?[\w.]+)`\](?![\[(])")
# An HF parameter entry: ``name (`type`, ...):`` or ``a, b (`type`):`` at the left margin.
_PARAMETER = re.compile(r"^(?P<names>[a-z_][\w]*(?:, [a-z_][\w]*)*) \((?P<rest>.*)$")
_SECTION = re.compile(r"^> (?P<title>.+)$")


def _reference(body: str, package: str) -> str:
    """The inline-code autorefs link of one role body (``~a.b.C``, ``.rel.mod``, ``Title <a.b>``)."""
    title = None
    titled = re.fullmatch(r"(?P<title>.*?)\s*<(?P<target>[^>]+)>", body)
    if titled:
        title, body = titled["title"], titled["target"]
    short = body.startswith("~")
    target = body.lstrip("~")
    if target.startswith("."):
        target = f"{package}{target}"
    shown = title or (target.rsplit(".", 1)[-1] if short else body.lstrip("~").lstrip("."))
    return f'<autoref identifier="{target}" optional><code>{shown}</code></autoref>'


def _parameter_lists(text: str) -> str:
    """HF ``> Section`` headings and ``name (type):`` entries as bold headings and Markdown list items."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        section = _SECTION.match(line)
        entry = _PARAMETER.match(line)
        if section:
            out.extend(["", f"**{section['title'].strip()}**", ""])
            i += 1
            continue
        if entry:
            header = [line]
            # a header may wrap: it ends at the line closing with ':'
            while not header[-1].rstrip().endswith(":") and i + 1 < len(lines) and lines[i + 1].strip():
                i += 1
                header.append(lines[i].strip())
            names = ", ".join(f"**{name}**" for name in entry["names"].split(", "))
            first = " ".join(header)[len(entry["names"]) :].strip().rstrip(":")
            out.append(f"- {names} {first}:")
            i += 1
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                if not lines[i].strip():
                    # a blank line ends the entry unless its description goes on after it
                    if i + 1 < len(lines) and lines[i + 1].startswith("    "):
                        out.append("")
                        i += 1
                        continue
                    break
                out.append("  " + lines[i][4:])
                i += 1
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


def rewrite_docstring(text: str, package: str) -> str:
    """``text`` with roles and HF links as autorefs code links and HF parameter lists as Markdown lists."""
    text = _ROLE.sub(lambda m: _reference(m["body"], package), text)
    text = _HF_LINK.sub(lambda m: _reference(m["body"], package), text)
    if re.search(r"^> ", text, flags=re.MULTILINE) or "*optional*" in text:
        text = _parameter_lists(text)
    return text


def _docstring_written_at_import(path: str) -> str | None:
    """The docstring a class without one in its source is given at import (``DiffusionSDPOConfig``'s, written from
    its fields' helps when first read), or ``None``; a dataclass's generated signature does not count."""
    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        return None
    # the class's own __doc__, read through the class: a descriptor stored there (the config's lazily written
    # docstring) gives its text only when read
    doc = cls.__doc__ if "__doc__" in vars(cls) else None
    if not isinstance(doc, str) or doc.startswith(f"{name}("):
        return None
    return inspect.cleandoc(doc)


class HFStyleDocstrings(griffe.Extension):
    """Rewrites every docstring of the loaded package once the object tree is complete."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.is_alias:
            return
        if obj.docstring is None and obj.is_class:
            written = _docstring_written_at_import(obj.path)
            if written:
                obj.docstring = griffe.Docstring(written, parent=obj)
        if obj.docstring is None:
            return
        module = obj.module
        package = module.path if module.is_package else module.path.rsplit(".", 1)[0]
        obj.docstring.value = rewrite_docstring(obj.docstring.value, package)
