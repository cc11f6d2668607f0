"""What heads every results table: the command that wrote it, the machine and the date."""

from __future__ import annotations

import os
import platform
import sys
import time

import jax

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, by device kind.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


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


def write_results(out: str, record: dict, lines: list[str]) -> None:
  """OUT.json (the record) and OUT.md (the lines), and the table printed."""
  import json

  with open(out + ".json", "w") as f:
    json.dump(record, f, indent=1)
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
  """An HTML comment naming the command (`python -m benchmarks.<module> argv`), the machine, the
  date and then `details` (wall time, protocol), so a table is never apart from how it was made."""
  argv = sys.argv[1:] if argv is None else argv
  machine = (f"{platform.node()} ({platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPUs, {jax.devices()[0].device_kind})")
  lines = [f"python -m benchmarks.{module} {' '.join(argv)}",
           f"machine: {machine}, date: {time.strftime('%Y-%m-%d')}", *details]
  return "<!-- " + "\n".join(lines) + " -->"
