"""What heads every results table: the command that wrote it, the machine, the date and the
commit of the code. The one module `benchmarks` and `experiments` share."""

from __future__ import annotations

import functools
import os
import pathlib
import platform
import subprocess
import sys
import time

import jax

from smat import host_memory

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, by device kind.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

ROOT = pathlib.Path(__file__).resolve().parent.parent  # the checkout the scripts run from


def peak_flops(device) -> float | None:
  """The card's dense bf16 peak (the denominator of MFU), or None where it is not known."""
  kind = getattr(device, "device_kind", "")
  return next((v for k, v in PEAK_BF16.items() if k in kind), None)


def parse_args(parser, argv: list[str] | None = None):
  """(args, overrides): `--config.FIELD=VALUE` and `--config.FIELD VALUE` are taken out first,
  as every smat command takes them; any other unknown flag is an error."""
  from smat.cli import split_overrides

  rest, overrides = split_overrides(sys.argv[1:] if argv is None else list(argv))
  return parser.parse_args(rest), overrides


def _git(root, *args: str) -> str | None:
  """`git ARGS` in `root`, its stdout; None where git is missing, fails or hangs."""
  try:
    done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                          timeout=30)
  except (OSError, subprocess.SubprocessError):
    return None
  return done.stdout if done.returncode == 0 else None


def git_commit(root=ROOT) -> dict | None:
  """{"full", "short", "dirty"} of the checkout at `root`, or None outside a git checkout or
  without git: a table names the code that made it. Dirty = tracked files differ from the
  commit; untracked files (the results being written, runs/) are not code that ran."""
  full, short = _git(root, "rev-parse", "HEAD"), _git(root, "rev-parse", "--short", "HEAD")
  if full is None or short is None:
    return None
  status = _git(root, "status", "--porcelain", "--untracked-files=no")
  return {"full": full.strip(), "short": short.strip(),
          "dirty": None if status is None else bool(status.strip())}


@functools.cache
def this_commit() -> dict | None:
  """`git_commit()` of this checkout, read once: a run that saves as it goes names the commit
  it started from in every save."""
  return git_commit()


def commit_text(commit: dict | None) -> str:
  """The commit as the .md header writes it."""
  if commit is None:
    return "commit: unknown (not a git checkout)"
  dirty = {True: ", with uncommitted changes", False: "", None: ", tree state unknown"}
  return f"commit: {commit['short']} ({commit['full']}){dirty[commit['dirty']]}"


def stamped(record: dict) -> dict:
  """`record` with the commit under record["provenance"]["commit"], for every results JSON."""
  return {**record, "provenance": {**record.get("provenance", {}), "commit": this_commit()}}


def write_results(out: str, record: dict, lines: list[str]) -> None:
  """OUT.json (the record, stamped with the commit) and OUT.md (the lines), and the table
  printed."""
  import json

  with open(out + ".json", "w") as f:
    json.dump(stamped(record), f, indent=1)
  text = "\n".join(lines)
  with open(out + ".md", "w") as f:
    f.write(text + "\n")
  print(text)


def busy_machine(max_load: float, allow_busy: bool) -> float | None:
  """The 1-minute load average, or None after printing the error for a machine too busy to
  time (a loaded machine reorders what is compared) unless `allow_busy`."""
  load = os.getloadavg()[0]
  if load > max_load and not allow_busy:
    print(f"error: the 1-minute load average is {load:.2f} (> --max-load {max_load}): timings "
          f"on a busy machine rank the settings wrongly; wait for an idle machine or pass "
          f"--allow-busy", file=sys.stderr)
    return None
  return load


def provenance(module: str, argv: list[str] | None, *details: str) -> str:
  """An HTML comment naming the command (`python -m MODULE argv`, MODULE dotted, e.g.
  `experiments.sweep`), the machine, the date, the commit and then `details` (wall time,
  protocol), so a table is never apart from how it was made."""
  argv = sys.argv[1:] if argv is None else argv
  machine = (f"{platform.node()} ({platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPUs, {jax.devices()[0].device_kind})")
  lines = [f"python -m {module} {' '.join(argv)}",
           f"machine: {machine}, host memory: {host_memory.describe()}, "
           f"date: {time.strftime('%Y-%m-%d')}",
           commit_text(this_commit()), *details]
  return "<!-- " + "\n".join(lines) + " -->"
