"""The repository's layout of scripts, results and docs: links resolve, every committed result is
in its folder's index, `experiments` and `benchmarks` share one helper module and nothing else,
and neither ships in the wheel."""

import ast
import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = [ROOT / "benchmarks" / "results", ROOT / "experiments" / "results"]
SHARED = "benchmarks.report"  # the one module both packages import
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def markdown_files() -> list[Path]:
  return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
          *(p for folder in RESULTS for p in sorted(folder.rglob("README.md")))]


def relative_links(path: Path) -> list[str]:
  """The link targets of a markdown file that point into the repository (no URL, no bare
  anchor), without their #fragment; fenced code is not markdown."""
  text = FENCE.sub("", path.read_text())
  targets = [t.split("#")[0] for t in LINK.findall(text)]
  return [t for t in targets if t and not re.match(r"[a-z]+:", t)]


def imported_modules(path: Path) -> set[str]:
  """Every module a file imports, `from a import b` counted as both `a` and `a.b` (b may be a
  submodule)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
  return found


def package_imports(package: str, other: str) -> dict[str, set[str]]:
  """{file of `package`: the modules of `other` it imports}."""
  out = {}
  for path in sorted((ROOT / package).rglob("*.py")):
    found = {m for m in imported_modules(path) if m == other or m.startswith(other + ".")}
    if found:
      out[str(path.relative_to(ROOT))] = found
  return out


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_markdown_link_resolves(path):
  missing = [t for t in relative_links(path) if not (path.parent / t).exists()]
  assert not missing, missing


@pytest.mark.parametrize("folder", RESULTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_committed_result_is_in_its_folders_index(folder):
  index = folder / "README.md"
  listed = {(folder / t).resolve() for t in relative_links(index)}
  files = [p for p in folder.rglob("*") if p.is_file() and p != index
           and "__pycache__" not in p.parts]
  assert files, folder
  unlisted = [str(p.relative_to(folder)) for p in files if p.resolve() not in listed]
  assert not unlisted, unlisted


def test_experiments_import_only_the_shared_module_of_benchmarks_and_benchmarks_none_of_them():
  from_benchmarks = package_imports("experiments", "benchmarks")
  assert from_benchmarks, "experiments should take the shared helpers from " + SHARED
  assert {f: m - {"benchmarks", SHARED} for f, m in from_benchmarks.items()
          if m - {"benchmarks", SHARED}} == {}
  assert package_imports("benchmarks", "experiments") == {}


def test_the_imports_are_read_from_the_code():
  """The checks above see `from a import b` and `import a.b` alike."""
  assert {"benchmarks", "benchmarks.report", "experiments", "experiments.sweep",
          "experiments.tables"} <= imported_modules(ROOT / "experiments" / "strategies.py")


def test_neither_scripts_package_ships_in_the_wheel():
  from setuptools import find_packages

  find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
  shipped = find_packages(str(ROOT), include=find["find"]["include"])
  assert "smat" in shipped
  assert not [p for p in shipped if p.split(".")[0] in ("benchmarks", "experiments", "tests")]


def test_provenance_names_the_commit_and_never_fails_outside_a_checkout(tmp_path):
  from benchmarks import report

  commit = report.git_commit(ROOT)
  head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                        text=True)
  if head.returncode == 0:
    assert commit["full"] == head.stdout.strip() and commit["full"].startswith(commit["short"])
    assert commit["dirty"] in (True, False)
  assert report.git_commit(tmp_path) is None  # not a git checkout
  assert report.commit_text(None) == "commit: unknown (not a git checkout)"
  assert report.commit_text({"full": "ab" * 20, "short": "abab", "dirty": True}) == (
      f"commit: abab ({'ab' * 20}), with uncommitted changes")
  header = report.provenance("experiments.sweep", ["--out", "F"], "wall time 1 min")
  assert header.startswith("<!-- python -m experiments.sweep --out F\n")
  assert report.commit_text(report.this_commit()) in header
  assert header.endswith("wall time 1 min -->")


def test_results_json_records_the_commit(tmp_path, monkeypatch):
  from benchmarks import report

  monkeypatch.setattr(report, "this_commit", lambda: {"full": "f" * 40, "short": "fffffff",
                                                      "dirty": False})
  record = {"rows": [1], "provenance": {"note": "kept"}}
  report.write_results(str(tmp_path / "out"), record, ["| a |"])
  saved = json.loads((tmp_path / "out.json").read_text())
  assert saved == {"rows": [1], "provenance": {"note": "kept", "commit": {
      "full": "f" * 40, "short": "fffffff", "dirty": False}}}
  assert record == {"rows": [1], "provenance": {"note": "kept"}}  # the caller's record untouched
  assert (tmp_path / "out.md").read_text() == "| a |\n"
