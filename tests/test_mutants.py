"""tools/mutants.py stays a faithful audit of README's rule table.

Running the mutants takes minutes (``python tools/mutants.py``); these
checks take milliseconds and catch a table that drifted from the README or
from the tests: every rule row of "How it stays correct" is broken by at
least one mutant, every mutant names a rule of the table, and every test a
mutant names exists, and every mutant's text is still in the code once.
"""

from __future__ import annotations

import re

from conftest import ROOT
from test_readme import README, defined_names
from tools import mutants

ROWS = [line.split("|")[1].strip() for line in
        README.split("## How it stays correct", 1)[1].split("\n## ", 1)[0].splitlines()
        if line.startswith("| ") and not line.startswith(("| rule ", "|---"))]


def test_every_rule_of_the_readme_table_has_a_mutant():
    """Each rule row (but the last, "all of the above") begins with the rule
    of at least one mutant, and each mutant's rule begins a row."""
    rules = {m.rule for m in mutants.MUTANTS}
    assert len(ROWS) >= 10, "the README lost its rule table"
    uncovered = [row for row in ROWS[:-1] if not any(row.startswith(rule) for rule in rules)]
    assert not uncovered, f"rules no mutant breaks: {uncovered}"
    unknown = [rule for rule in rules if not any(row.startswith(rule) for row in ROWS)]
    assert not unknown, f"mutants break rules the README does not list: {unknown}"


def test_mutants_have_names_and_tests_that_exist():
    """At least 40 mutants with distinct names; each names test functions
    that are defined in existing test files."""
    names = [m.name for m in mutants.MUTANTS]
    assert len(names) >= 40 and len(set(names)) == len(names)
    missing = []
    for mutant in mutants.MUTANTS:
        assert mutant.tests, mutant.name
        for node in mutant.tests:
            path, _, test = node.partition("::")
            test = re.sub(r"\[.*\]$", "", test)
            if not (ROOT / path).is_file() or test not in defined_names(ROOT / path):
                missing.append(f"{mutant.name}: {node}")
    assert not missing, f"mutants name tests that do not exist: {missing}"


def test_every_mutant_still_finds_its_text():
    """Each mutant's text to replace occurs exactly once in its file, so a
    restructure that rewrites a guarded line makes this fail at once instead
    of turning the mutant STALE in the next audit."""
    stale = {m.name: why for m in mutants.MUTANTS
             if (why := mutants.stale(ROOT, m)) is not None}
    assert not stale, f"mutants whose text moved or changed: {stale}"
