"""The package's boundaries, enforced: import-linter's contracts (pyproject.toml) — ops above pipeline
above registry above evaluation/training/intake above model/store above config/records/text/policy/
errors, and shoefix_tasks never importing Airflow — and no module left in the flat layout."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WINGS = {"intake", "model", "training", "evaluation", "registry", "store", "ops"}
TOP = {"__init__", "config", "records", "text", "policy", "errors", "pipeline", "train"}


def test_import_linter_contracts_are_kept():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    out = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "2 kept, 0 broken" in out.stdout


def test_the_layout_is_the_architecture():
    pkg = ROOT / "shoefix_tasks"
    assert {p.stem for p in pkg.glob("*.py")} == TOP
    assert {p.name for p in pkg.iterdir() if p.is_dir() and (p / "__init__.py").is_file()} == WINGS
    for wing in WINGS:  # each wing says what it is for
        assert (pkg / wing / "__init__.py").read_text().startswith('"""')


def test_the_architecture_document_lists_every_module():
    """docs/architecture.md's layout block names each module under its wing, and nothing that is gone."""
    import re

    doc = (ROOT / "docs" / "architecture.md").read_text()
    block = doc.split("shoefix_tasks/", 1)[1].split("recipes/", 1)[0]
    listed, wing = set(), ""
    for line in block.splitlines():
        m = re.match(r"^  (\s*)([a-z_]+)(/|\.py)\s", line)
        if not m:
            continue
        if m.group(3) == "/":
            wing = m.group(2)
        else:
            listed.add(f"{wing}/{m.group(2)}" if m.group(1) else m.group(2))
    pkg = ROOT / "shoefix_tasks"
    actual = {str(p.relative_to(pkg).with_suffix("")) for p in pkg.rglob("*.py") if p.stem != "__init__"}
    assert listed == actual, {"not in the doc": sorted(actual - listed), "gone": sorted(listed - actual)}


def test_no_airflow_import_in_the_package():
    hits = [f"{p}:{n}" for p in (ROOT / "shoefix_tasks").rglob("*.py")
            for n, line in enumerate(p.read_text().splitlines(), 1)
            if line.strip().startswith(("import airflow", "from airflow"))]
    assert hits == []


def test_the_tests_mirror_the_package_and_never_edit_sys_path():
    """One test folder per wing, plus the DAGs, the cross-wing groups and the benchmarks' checks; DAG
    modules are imported as Airflow imports them (its dags folder is on the path), never through
    sys.path edits in a test."""
    import re

    tests = ROOT / "tests"
    folders = {p.name for p in tests.iterdir() if p.is_dir() and p.name not in ("fixtures", "__pycache__")}
    assert folders == WINGS | {"dags", "integration", "stack", "reliability", "benchmarks"}
    edit = re.compile(r"\bsys\.path\s*(\.(insert|append|extend)\(|\+?=(?!=)|\[[^\]]*\]\s*=)|syspath_prepend\("
                      r"|setattr\(\s*sys\s*,\s*[\"']path|addsitedir\(")
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in tests.rglob("*.py") if p != Path(__file__)
            for n, line in enumerate(p.read_text().splitlines(), 1) if edit.search(line)]
    assert hits == []
