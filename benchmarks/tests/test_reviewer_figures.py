"""benchmarks/tools/reviewer_figures.py's source counts, on sources written here: each form it counts is found at its
line, and what it must not count (writes, public names, other objects, definitions) is left out."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("reviewer_figures", ROOT / "benchmarks/tools/reviewer_figures.py")
figures = importlib.util.module_from_spec(spec)
spec.loader.exec_module(figures)


def test_private_trainer_reads_count_loads_of_the_trainers_underscored_names():
    source = "\n".join(
        [
            "def f(trainer, self, other):",
            "    trainer._policy()",  # 2: counted
            "    self.trainer._dtype",  # 3: counted
            "    getattr(trainer, '_eval_collator')",  # 4: counted
            "    trainer.policy, trainer.__class__, other._x, self._x",  # public, dunder, other objects
            "    trainer._state = 1",  # a write
            "    getattr(other, '_x'), getattr(trainer, 'args')",
            "    self.trainer._load(trainer._tag_names)",  # 8: two
        ]
    )
    assert figures.private_trainer_reads_in(source) == [
        (2, "_policy"),
        (3, "_dtype"),
        (4, "_eval_collator"),
        (8, "_load"),
        (8, "_tag_names"),
    ]


def test_is_online_reads_count_attribute_loads_and_getattr_not_definitions():
    source = "\n".join(
        [
            "class Config:",
            "    is_online = False",  # a definition
            "def f(args):",
            "    if args.is_online:",  # 4
            "        return getattr(args, 'is_online', False)",  # 5
            "    args.is_online = True",  # a write
            "    return is_online_config(args)",  # a name, not the attribute
        ]
    )
    assert figures.is_online_reads_in(source) == [4, 5]


def test_the_package_scans_skip_the_trainer_module_and_the_online_folder(tmp_path):
    package = tmp_path / "pkg"
    (package / "online").mkdir(parents=True)
    (package / "trainer.py").write_text("def f(trainer):\n    return trainer._x, trainer.args.is_online\n")
    (package / "online" / "run.py").write_text("def f(trainer):\n    return trainer.args.is_online\n")
    (package / "use.py").write_text("def f(trainer):\n    return trainer._x, trainer.args.is_online\n")
    assert figures.private_trainer_reads(package) == ["pkg/use.py:2 _x"]
    assert figures.is_online_reads(package) == ["pkg/trainer.py:2", "pkg/use.py:2"]


def test_traced_groups_functions_by_file():
    found = figures.traced([["a.py", "f"], ["a.py", "g"], ["b/c.py", "C.h"]])
    assert (found["functions"], found["files"]) == (3, 2)
    assert found["by_file"] == {"a.py": ["f", "g"], "b/c.py": ["C.h"]}
