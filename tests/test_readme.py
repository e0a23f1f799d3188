"""The README is course text: the code and tests it names must exist.

A reference is written ``path.py:name`` in backticks; ``name`` must be a
function, method or class defined in that file (found by parsing it, so
nothing is imported or run).
"""

from __future__ import annotations

import ast
import functools
import re

from conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")
REFERENCE = re.compile(r"`([\w./-]+\.py):(\w+)`")


@functools.lru_cache(maxsize=None)   # the README names some files dozens of times
def defined_names(path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def test_every_referenced_function_and_test_exists():
    """Each `file.py:function` in README.md names a file that exists and a
    function, method or class defined in it."""
    references = REFERENCE.findall(README)
    assert len(references) >= 10, "the README lost its rule table"
    missing = [f"{path}:{name}" for path, name in references
               if not (ROOT / path).is_file() or name not in defined_names(ROOT / path)]
    assert not missing, f"README names code that does not exist: {missing}"


def test_ci_runs_the_readme_test_command():
    """.ci/run runs exactly the test command the README gives."""
    command = re.search(r"^(python -m pytest[^#]*?)\s+# run the tests", README, re.MULTILINE)
    assert command, "README quick start lost its test command"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command.group(1) in [line.strip() for line in ci]


def test_readme_shows_the_attempt_outcome_diagram():
    """The README's outcome diagram is the one in db_utils.Outcome, line for line,
    and every outcome in the transition table appears in it."""
    import db_utils
    doc = db_utils.Outcome.__doc__
    diagram = [line.strip() for line in doc[doc.index("::\n") + 3:].split("\n\n    The")[0]
               .splitlines() if line.strip()]
    shown = README.split("```text\nleased --+", 1)[1].split("```", 1)[0]
    assert [line.strip() for line in ("leased --+" + shown).splitlines() if line.strip()] == diagram
    for outcome, sources in db_utils.TRANSITIONS.items():
        assert all(state in "\n".join(diagram) for state in (outcome, *sources))


def test_readme_protocol_table_is_the_schema():
    """The README's Protocol table lists exactly protocol.MESSAGES: the same
    types in the same order, each with the same field names (backticked
    names outside parentheses in its third column)."""
    import protocol
    table = README.split("| type | direction | fields |", 1)[1].split("\n\n", 1)[0]
    rows = [line.split("|") for line in table.strip().splitlines()[1:]]
    documented = {re.findall(r"`(\w+)`", cells[1])[0]:
                  re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", cells[3])) for cells in rows}
    assert list(documented) == list(protocol.MESSAGES)
    assert documented == {type_: list(spec) for type_, spec in protocol.MESSAGES.items()}
