"""A real full disk under `smat meta-train` (slow; needs root to mount a tmpfs, so not collected
by pytest — tests/test_failures.py injects the same fault without a mount):

  sudo python tests/disk_full_tmpfs.py

The workdir lives on a 4 MiB tmpfs. Epoch 1 of a PMF smoke run is written, then the tmpfs is
filled (to the last byte, or leaving room for the logs but not the next checkpoint) and the run
resumed: it must end with exit 2 and one `error:` line (no traceback) and keep the epoch-1
checkpoint; with the space freed the same command finishes the run.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main() -> int:
  import jax

  from smat import config as config_lib
  from smat import metatrain
  from smat.data.sources import glyphs
  from smat.models import checkpoint, vit

  scratch = Path(tempfile.mkdtemp(prefix="smat-disk-full-"))
  data_dir = scratch / "data"
  glyphs.build(data_dir, glyphs.GlyphsConfig(size=16, instances=6, scripts=(
      "ARMENIAN", "GEORGIAN", "HEBREW"), max_classes_per_script=30), workers=1, progress=False)
  tiny = vit.ViTConfig(patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32, image_size=16)
  checkpoint.save(str(scratch / "backbone"), vit.init(tiny, jax.random.key(0)), tiny)
  mount = scratch / "small_disk"
  mount.mkdir()
  subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
  try:
    overrides = [f"--config.data_dir={data_dir}", f"--config.backbone.path={scratch / 'backbone'}",
                 "--config.data.image_size=16"]
    config = config_lib.load("pmf_glyphs:smoke", overrides)
    # 0: full before the run starts; 32 KiB: the lock and the logs fit, the checkpoint does not.
    for headroom in (0, 32 * 1024):
      workdir = mount / f"run{headroom}"
      metatrain.train_and_evaluate(config, str(workdir), stop_after=2, progress=False)
      filler = mount / "filler"
      with open(filler, "wb", buffering=0) as f:  # fill the disk to the last byte
        try:
          while True:
            f.write(b"\0" * 4096)
            f.flush()
        except OSError:
          pass
      os.truncate(filler, max(0, filler.stat().st_size - headroom))
      command = [sys.executable, "-m", "smat.cli", "meta-train", "--config",
                 "pmf_glyphs:smoke", "--workdir", str(workdir), *overrides]
      full = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
      last = full.stderr.replace("\r", "\n").rstrip("\n").split("\n")[-1]
      print(f"headroom {headroom}: exit {full.returncode}; {last}")
      if os.environ.get("VERBOSE"):
        print(full.stderr[-8000:])
      assert full.returncode == 2, full.stderr[-3000:]
      assert last.startswith("error: ") and "Traceback" not in full.stderr, full.stderr[-3000:]
      steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
      assert steps == [2], steps
      filler.unlink()
      again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
      print(f"space freed: exit {again.returncode}; {again.stdout.strip().splitlines()[-1:]}")
      assert again.returncode == 0, again.stderr[-3000:]
  finally:
    subprocess.run(["umount", str(mount)], check=False)
    shutil.rmtree(scratch, ignore_errors=True)
  print("ok")
  return 0


if __name__ == "__main__":
  sys.exit(main())
