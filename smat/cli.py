"""`smat` command line: parses flags and calls library functions, nothing more.

  smat reproduce                       the main job on the offline benchmark (README)
  smat data prepare glyphs             build the offline glyphs benchmark (cached)
  smat data describe SPEC [--json]     classes per split, images per class, metadata
  smat data show SPEC --out FILE.png   one sampled episode as an image grid

SPEC: glyphs:id | glyphs:ood | glyphs:<script> | fashion_mnist | folder:<path> |
      tfds:<name>[:<split>] | md_h5:<dir>:<source>   (comma-separated lists allowed)
"""

from __future__ import annotations

import argparse
import json
import sys

from smat.errors import SmatError


def _data_dir_arg(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--data-dir", default=None,
                      help="where built datasets live (default: $SMAT_DATA_DIR or ~/.cache/smat)")


def _cmd_prepare(args) -> None:
  from smat.data.sources import fashion_mnist, glyphs
  from smat.data.spec import default_data_dir

  if args.dataset == "fashion_mnist":
    domain = fashion_mnist.load()
    print(f"fashion_mnist: {domain.describe()['num_images']} images found in {domain.metadata['path']}")
    return
  config = glyphs.GlyphsConfig(
      size=args.size, instances=args.instances, seed=args.seed,
      scripts=tuple(s.strip().upper().replace("_", " ") for s in args.scripts.split(","))
      if args.scripts else None,
      max_classes_per_script=args.max_classes_per_script)
  data_dir = args.data_dir or default_data_dir()
  path = glyphs.build(data_dir, config, font_dir=args.font_dir, workers=args.workers)
  meta = json.loads((path / "metadata.json").read_text())
  print(f"glyphs: {len(meta['id_scripts'])} ID scripts, {len(meta['ood_scripts'])} held-out scripts, "
        f"{len(meta['classes'])} classes, {meta['num_images']} images in {path}")


def _cmd_describe(args) -> None:
  from smat.data.spec import load_domains

  domains = load_domains(args.spec, args.data_dir, skip_corrupt=args.skip_corrupt)
  described = [d.describe() for d in domains]
  if args.json:
    per_split = {}
    for split in ("train", "val", "test"):
      per_split[split] = {
          "num_classes": sum(d["splits"][split]["num_classes"] for d in described),
          "num_images": sum(d["splits"][split]["num_images"] for d in described)}
    print(json.dumps({"spec": args.spec,
                      "num_classes": sum(d["num_classes"] for d in described),
                      "num_images": sum(d["num_images"] for d in described),
                      "splits": per_split, "domains": described}, indent=1))
    return
  for d in described:
    print(f"{d['name']}: {d['num_classes']} classes, {d['num_images']} images")
    for split, s in d["splits"].items():
      if not s["num_classes"]:
        continue
      ipc = s["images_per_class"]
      groups = f", {len(s['groups'])} groups" if s["groups"] else ""
      print(f"  {split:5s} {s['num_classes']:5d} classes{groups}; images/class "
            f"min {ipc['min']} median {ipc['median']:g} max {ipc['max']}")
    for key, value in d["metadata"].items():
      print(f"  {key}: {value}")


def _sampler_from_args(args):
  from smat.data.samplers import FixedSampler, MetaDatasetSampler

  if args.sampler == "md":
    return MetaDatasetSampler()
  return FixedSampler(args.ways, args.shots, args.queries)


def _cmd_show(args) -> None:
  from smat.data.loader import EpisodeSource
  from smat.data.show import episode_grid
  from smat.data.spec import load_domains

  domains = load_domains(args.spec, args.data_dir, skip_corrupt=args.skip_corrupt)
  source = EpisodeSource(tuple(domains), args.split, _sampler_from_args(args), args.image_size,
                         seed=args.seed)
  episode = source.episode(args.index)
  episode_grid(episode).save(args.out)
  print(f"{args.out}: episode {args.index} of {domains[int(episode.domain)].name} [{args.split}], "
        f"{int(episode.class_mask.sum())}-way, {int(episode.support_mask.sum())} support, "
        f"{int(episode.query_mask.sum())} query images")


def _cmd_reproduce(args) -> None:
  from smat import pipeline

  pipeline.reproduce(args.workdir, args.data_dir, config_path=args.config)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="smat", formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Sparse MetA-Tuning (SMAT): meta-learned sparse interpolated experts over a "
                  "frozen pre-trained ViT for few-shot classification.",
      epilog=__doc__.split("\n", 2)[2])
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

  reproduce = commands.add_parser(
      "reproduce", help="main job on the offline benchmark: build data, describe it, sample episodes")
  reproduce.add_argument("--workdir", default="runs/offline", help="outputs (default: runs/offline)")
  reproduce.add_argument("--config", default="configs/glyphs_small.py", help="experiment config")
  _data_dir_arg(reproduce)
  reproduce.set_defaults(run=_cmd_reproduce)

  data = commands.add_parser("data", help="prepare, describe and look at data")
  data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

  prepare = data_commands.add_parser("prepare", help="build the offline glyphs benchmark (idempotent)")
  prepare.add_argument("dataset", choices=["glyphs", "fashion_mnist"])
  _data_dir_arg(prepare)
  prepare.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
  prepare.add_argument("--instances", type=int, default=20, help="images per class (default 20)")
  prepare.add_argument("--seed", type=int, default=0)
  prepare.add_argument("--scripts", default=None, help="only these scripts, comma-separated")
  prepare.add_argument("--max-classes-per-script", type=int, default=None)
  prepare.add_argument("--font-dir", default="/usr/share/fonts/truetype/noto")
  prepare.add_argument("--workers", type=int, default=None, help="render processes (default: cores)")
  prepare.set_defaults(run=_cmd_prepare)

  describe = data_commands.add_parser("describe", help="classes per split, images per class, metadata")
  describe.add_argument("spec", metavar="SPEC")
  describe.add_argument("--json", action="store_true", help="one JSON object on stdout")
  describe.add_argument("--skip-corrupt", action="store_true",
                        help="skip unreadable images (counted) instead of failing")
  _data_dir_arg(describe)
  describe.set_defaults(run=_cmd_describe)

  show = data_commands.add_parser("show", help="one sampled episode as an image grid (PNG)")
  show.add_argument("spec", metavar="SPEC")
  show.add_argument("--out", required=True, help="output PNG file")
  show.add_argument("--seed", type=int, default=0)
  show.add_argument("--index", type=int, default=0, help="episode index in the stream")
  show.add_argument("--split", default="test", choices=["train", "val", "test"])
  show.add_argument("--sampler", default="fixed", choices=["fixed", "md"],
                    help="fixed N-way K-shot (default) or Meta-Dataset variable-way variable-shot")
  show.add_argument("--ways", type=int, default=5)
  show.add_argument("--shots", type=int, default=1)
  show.add_argument("--queries", type=int, default=5)
  show.add_argument("--image-size", type=int, default=64)
  show.add_argument("--skip-corrupt", action="store_true")
  _data_dir_arg(show)
  show.set_defaults(run=_cmd_show)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    args.run(args)
  except SmatError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
