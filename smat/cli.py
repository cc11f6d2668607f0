"""`smat` command line: parses flags and calls library functions, nothing more.

  smat reproduce                       the main job on the offline benchmark (docs/install.md)
  smat data prepare glyphs|emoji|icons build an offline benchmark source (cached)
  smat data describe SPEC [--json]     classes per split, images per class, metadata
  smat data show SPEC --out FILE.png   one sampled episode as an image grid
  smat pretrain --config C --workdir D pre-train a small backbone (θ_pre): supervised
                                       (pretrain_glyphs) or DINO, self-supervised on an
                                       unlabeled pool (pretrain_dino_glyphs)
  smat meta-train --config C --workdir D [--distributed]
                                       meta-train SMAT / SoftMerge / PMF (config.method);
                                       --config.experts.masks=random|map|influence|selfpruner|
                                       circuit puts a hand-designed mask strategy in place of
                                       the gates; --distributed joins several hosts
  smat evaluate --workdir D --domains SPEC --out F.json [--adapt MODE]
                                       few-shot accuracy of a run (or --method pre), zero-shot
                                       or fine-tuned on each support: full, lora, sparse (SMAT's
                                       mask) or a sparsity strategy (random, map, influence,
                                       selfpruner, circuit)
  smat plot --workdir D --out DIR      mask density per block/type/expert, expert choice map
  smat import-backbone --format timm|hf --weights F.safetensors --arch ARCH --out D
                                       DINO weights → a backbone directory
  smat export --workdir D [--support DIR | --alpha uniform] --out F.safetensors
                                       a model (θ_pre, PMF's θ_pre + δ, SMAT's θ_task for a
                                       support set) as timm-layout safetensors
  smat embed --backbone B --images DIR --out F.npz
                                       backbone features of an image folder

Configs: --config NAME[:VARIANT] names a packaged config (glyphs_small, pretrain_glyphs,
      pretrain_dino_glyphs, smat_glyphs, pmf_glyphs, softmerge_glyphs, smat_vits16_md, ...;
      e.g. smat_glyphs:smoke)
      or FILE.py[:VARIANT] any config file. reproduce, pretrain and meta-train take any number
      of --config.FIELD=VALUE (or --config.FIELD VALUE) overrides; other commands refuse them.
      Relative paths in configs (backbone.path, data_dir) are from the current directory.
BACKBONE (B): a backbone directory (from pretrain or import-backbone) or a .safetensors file
      with --format timm|hf --arch ARCH (vit_s16, vit_b16: DINO; vit_s14_dinov2, vit_b14_dinov2:
      DINOv2 in timm's layout; vit_s14_dinov2_reg4, vit_b14_dinov2_reg4: DINOv2 with registers).

SPEC: glyphs:id | glyphs:ood | glyphs:<script> | emoji:id | emoji:ood | emoji:<category> |
      icons:id | fashion_mnist | folder:<path> | tfds:<name>[:<split>] | md_h5:<dir>:<source>
      (comma-separated lists allowed);
      folder: and tfds: take a class split for meta-training: 'folder:<path>?split=70/15/15'
      (&seed=N, split=FILE.json, split=cifar_fs for tfds:cifar100, groups=dirs, by=group;
      docs/data.md, "Your own images")

Environment: SMAT_DATA_DIR (built datasets, default ~/.cache/smat), SMAT_THREADS=N (pin XLA's
      CPU threads, for bit-identical results across machines), SMAT_COMPILE_CACHE=DIR|off
      (compiled steps are kept in <data dir>/xla_cache/<machine> and reused by later runs)
"""

from __future__ import annotations

import argparse
import errno
import json
import sys

from smat import __version__
from smat.errors import SmatError

# `smat.finetune.ADAPTERS` and zero-shot (spelt out: building the parser must not import jax).
ADAPT_MODES = ("zero-shot", "full", "lora", "sparse", "random", "map", "influence", "selfpruner",
               "circuit")
# `smat.models.convert.FORMATS` and `sorted(smat.models.vit.PRESETS)`, spelt out likewise.
FORMATS = ("timm", "hf")
ARCHS = ("vit_b14_dinov2", "vit_b14_dinov2_reg4", "vit_b16", "vit_mini_p4", "vit_s14_dinov2",
         "vit_s14_dinov2_reg4", "vit_s16", "vit_tiny_p4")


def _distributed_arg(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--distributed", action="store_true",
                      help="multi-host run: call jax.distributed.initialize() first (coordinator "
                           "and process ids from SLURM / TPU pod / Open MPI, or "
                           "JAX_COORDINATOR_ADDRESS=host:port, SMAT_NUM_PROCESSES, SMAT_PROCESS_ID); every "
                           "process runs the same command and feeds its slice of each batch")


def _data_dir_arg(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--data-dir", default=None,
                      help="where built datasets live (default: $SMAT_DATA_DIR or ~/.cache/smat)")


def _cmd_prepare(args) -> None:
  from smat.data.sources import fashion_mnist, glyphs
  from smat.data.spec import default_data_dir

  _at_least(args, 1, "size", "instances", "workers", "max_classes_per_script",
             "max_classes_per_category", "max_classes", "min_sets")
  _at_least(args, 0, "seed")
  if args.dataset == "fashion_mnist":
    domain = fashion_mnist.load()
    print(f"fashion_mnist: {domain.describe()['num_images']} images found in {domain.metadata['path']}")
    return
  if args.dataset == "emoji":
    _prepare_emoji(args)
    return
  if args.dataset == "icons":
    _prepare_icons(args)
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


def _prepare_emoji(args) -> None:
  from smat.data.sources import emoji
  from smat.data.spec import default_data_dir

  sets = tuple(s.strip() for s in args.emoji_sets.split(",")) if args.emoji_sets else tuple(emoji.SETS)
  config = emoji.EmojiConfig(size=args.size, instances=args.instances, seed=args.seed, sets=sets,
                             min_sets=min(len(sets), emoji.EmojiConfig.min_sets),
                             max_classes_per_category=args.max_classes_per_category)
  path = emoji.build(args.data_dir or default_data_dir(), config)
  meta = json.loads((path / "metadata.json").read_text())
  print(f"emoji: {len(meta['id_categories'])} ID categories, {len(meta['ood_categories'])} "
        f"held-out categories, {len(meta['classes'])} classes, {meta['num_images']} images in "
        f"{path}")


def _prepare_icons(args) -> None:
  from smat.data.sources import icons
  from smat.data.spec import default_data_dir

  sets = (tuple(s.strip() for s in args.icon_sets.split(",") if s.strip()) if args.icon_sets
          else icons.DEFAULT_SETS)
  min_sets = args.min_sets or min(len(sets), icons.IconsConfig.min_sets)
  config = icons.IconsConfig(size=args.size, instances=args.instances, seed=args.seed, sets=sets,
                             min_sets=min_sets, max_classes=args.max_classes)
  path = icons.build(args.data_dir or default_data_dir(), config)
  meta = json.loads((path / "metadata.json").read_text())
  groups = {c["group"] for c in meta["classes"] if c["group"]}
  print(f"icons: {len(meta['classes'])} classes ({len(groups)} groups), {meta['num_images']} "
        f"images from {len(meta['sets'])} icon sets in {path}")
  for prefix, skipped in meta["skipped_sets"].items():
    print(f"  skipped {prefix}: {skipped['reason']}")


def _cmd_describe(args) -> None:
  from smat.data.domain import SPLITS
  from smat.data.spec import load_domains

  domains = load_domains(args.spec, args.data_dir, skip_corrupt=args.skip_corrupt)
  described = [d.describe() for d in domains]
  if args.json:
    per_split = {}
    for split in SPLITS:
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


def _sampler_args(parser: argparse.ArgumentParser, queries: int) -> None:
  parser.add_argument("--sampler", default="fixed", choices=["fixed", "md"],
                      help="fixed N-way K-shot (default) or Meta-Dataset variable-way "
                           "variable-shot")
  parser.add_argument("--ways", type=int, default=5)
  parser.add_argument("--shots", type=int, default=1)
  parser.add_argument("--queries", type=int, default=queries)


def _at_least(args, minimum: int, *names: str) -> None:
  """Every count up front: a zero or negative count would give a traceback, a silent fallback
  or a meaningless number (0 queries report 0.00 ± 0.00)."""
  for name in names:
    value = getattr(args, name, None)
    if value is not None and value < minimum:
      raise SmatError(f"--{name.replace('_', '-')} {value}: must be at least {minimum}")


def _sampler_from_args(args):
  from smat.data.samplers import FixedSampler, MetaDatasetSampler

  _at_least(args, 1, "shots", "queries", "episodes", "batch_size", "image_size")
  _at_least(args, 0, "seed", "index")
  _at_least(args, 2, "ways")
  if args.sampler == "md":
    return MetaDatasetSampler()
  return FixedSampler(args.ways, args.shots, args.queries)


def _cmd_show(args) -> None:
  from smat import outputs
  from smat.data.loader import EpisodeSource
  from smat.data.show import episode_grid
  from smat.data.spec import load_domains

  outputs.check_output(args.out, "--out", (".png",))
  sampler = _sampler_from_args(args)
  domains = load_domains(args.spec, args.data_dir, skip_corrupt=args.skip_corrupt)
  source = EpisodeSource(tuple(domains), args.split, sampler, args.image_size, seed=args.seed)
  episode = source.episode(args.index)
  grid = episode_grid(episode)
  outputs.write_atomic(args.out, lambda f: grid.save(f, format="PNG"), "wb")
  print(f"{args.out}: episode {args.index} of {domains[int(episode.domain)].name} [{args.split}], "
        f"{int(episode.class_mask.sum())}-way, {int(episode.support_mask.sum())} support, "
        f"{int(episode.query_mask.sum())} query images")


def _cmd_reproduce(args) -> None:
  from smat import pipeline

  pipeline.reproduce(args.workdir, args.data_dir, config_path=args.config,
                     overrides=args.overrides, benchmark=args.benchmark)


def _cmd_pretrain(args) -> None:
  from smat import config, pretrain

  _distributed(args)
  result = pretrain.pretrain(config.load(args.config, args.overrides), args.workdir)
  print(f"backbone: {args.workdir}/backbone")
  print(result["table"])


def _distributed(args) -> None:
  """Multi-host: join the jax.distributed runtime before any device is touched."""
  if args.distributed:
    import os

    import jax

    counts = {"num_processes": "SMAT_NUM_PROCESSES", "process_id": "SMAT_PROCESS_ID"}
    jax.distributed.initialize(**{k: int(os.environ[v]) for k, v in counts.items()
                                  if v in os.environ})


def _cmd_meta_train(args) -> None:
  from smat import config, metatrain

  _distributed(args)
  summary = metatrain.train_and_evaluate(config.load(args.config, args.overrides), args.workdir)
  if summary["stopped_at"] < summary["total_steps"]:
    print(f"stopped at step {summary['stopped_at']} of {summary['total_steps']}")
  best = summary.get("best")
  if best:
    print(f"{summary['method']}: best validation accuracy {best['val_accuracy']:.2f} ± "
          f"{best['val_ci95']:.2f}% at step {best['step']} "
          f"({metatrain.find_checkpoint(args.workdir)[2]})")


def _finetune_from_args(args):
  from smat import finetune

  lrs = finetune.LEARNING_RATES
  if args.lrs:
    try:
      lrs = tuple(float(x) for x in args.lrs.split(","))
    except ValueError:
      raise SmatError(f"--lrs {args.lrs!r}: give comma-separated numbers, e.g. 0,1e-4,1e-3")
  if args.finetune_steps < 0 or args.lr_search_episodes < 1:
    raise SmatError("--finetune-steps must be ≥ 0 and --lr-search-episodes ≥ 1")
  return finetune.FinetuneConfig(steps=args.finetune_steps, lrs=lrs,
                                 search_episodes=args.lr_search_episodes)


def _cmd_plot(args) -> None:
  import os

  from smat import config as config_lib
  from smat import metatrain, plots
  from smat.data.spec import load_domains

  run = metatrain.load_run(args.workdir, args.checkpoint)
  if run.hp.method == "pmf":
    raise SmatError(f"{args.workdir} is a PMF run: it has no experts or router to plot")
  config = config_lib.from_json(os.path.join(args.workdir, "config.json"))
  domains = load_domains(args.domains or config.data.train, args.data_dir, seed=args.seed)
  written = plots.write_run_figures(run, args.out, {d.name: [d] for d in domains},
                                    _sampler_from_args(args), config.data.image_size,
                                    args.episodes, args.seed)
  print(f"wrote {', '.join(written)} to {args.out}")


def _cmd_evaluate(args) -> None:
  from smat import evaluate, outputs
  from smat.data.episodes import split_resize_ratio
  from smat.data.spec import load_domains

  outputs.check_output(args.out, "--out", (".json",))
  sampler = _sampler_from_args(args)
  ft = _finetune_from_args(args)
  if args.method == "pre":
    if not args.backbone:
      raise SmatError("--method pre evaluates a frozen backbone: give --backbone DIR (or a "
                  ".safetensors file with --format and --arch)")
    subject = evaluate.Subject.of_backbone(args.backbone, args.format, args.arch)
  else:
    if not args.workdir:
      raise SmatError("give --workdir of a `smat meta-train` run, or --method pre --backbone B")
    subject = evaluate.Subject.of_run(args.workdir)
  domains = args.domains
  if domains is None:
    domains = ",".join(subject.test_specs)
    if not domains:
      raise SmatError("give --domains SPEC[,SPEC...] (only a run whose config names its "
                      "benchmark's test sources, data.test, has a default)")
  specs = [s.strip() for s in domains.split(",") if s.strip()]
  if not specs:
    raise SmatError(f"--domains {domains!r}: no data SPEC given; e.g. --domains glyphs:ood")
  ratio = split_resize_ratio("test", subject.resize_ratio if args.test_resize_ratio is None
                             else args.test_resize_ratio)
  if args.id_domains is not None:
    id_specs = [s for s in args.id_domains.split(",") if s]
  else:
    id_specs = [s for s in specs if s in subject.trained_specs]
  groups = {spec: load_domains(spec, args.data_dir, skip_corrupt=args.skip_corrupt,
                               seed=args.seed) for spec in specs}
  protocol = evaluate.Protocol(sampler, args.image_size or subject.image_size, args.episodes,
                               args.seed, reserved=ft.search_episodes, resize_ratio=ratio)
  results = evaluate.evaluate(subject.model, groups, protocol, args.adapt, ft, args.lr,
                              args.batch_size)
  evaluate.check_results(results)
  out = evaluate.record(results, protocol, subject.method, id_specs, args.adapt, ft,
                        workdir=args.workdir, backbone=args.backbone,
                        config=subject.config.to_dict() if subject.config else None)
  table = out["table"]
  print(table)  # before the write: a failed write loses no numbers
  outputs.write_atomic(args.out, lambda f: json.dump(out, f, indent=1))
  averages = out["averages"]
  print(f"ID average: {averages['id'] if averages['id'] is None else round(averages['id'], 2)}"
        f", OOD average: "
        f"{averages['ood'] if averages['ood'] is None else round(averages['ood'], 2)}"
        f"  ({args.out})")


def _cmd_import_backbone(args) -> None:
  from smat.models import checkpoint

  overrides = {} if args.layer_norm_eps is None else {"layer_norm_eps": args.layer_norm_eps}
  checkpoint.check_writable(args.out, args.force)  # before the weights are read
  params, config = checkpoint.load(args.weights, args.format, args.arch, **overrides)
  checkpoint.save(args.out, params, config, force=args.force, source=args.weights,
                  format=args.format, arch=args.arch)
  print(f"{args.out}: {args.arch} from {args.format} weights "
        f"(layer_norm_eps {config.layer_norm_eps}, {config.image_size} px position embeddings)")


def _cmd_export(args) -> None:
  from smat import export, outputs

  outputs.check_output(args.out, "--out", (".safetensors",))
  if bool(args.workdir) == bool(args.backbone):
    raise SmatError("give --workdir D (a meta-train run) or --backbone B (a backbone "
                    "directory), one of them")
  if args.backbone:
    if args.support or args.alpha:
      raise SmatError("--support and --alpha choose a task's θ of a run; a backbone is one "
                      "model: drop them")
    params, config, meta = export.from_backbone(args.backbone)
  else:
    params, config, meta = export.from_run(args.workdir, args.checkpoint, args.support,
                                           args.alpha, args.skip_corrupt)
  export.save(args.out, params, config, meta, args.format)
  alpha = f", α = {', '.join(f'{a:.3f}' for a in meta['alpha'])}" if "alpha" in meta else ""
  print(f"{args.out}: {meta['model']} in {args.format} layout "
        f"({config.width} wide, {config.depth} blocks{alpha})")


def _cmd_embed(args) -> None:
  import numpy as np

  from smat import embed, outputs
  from smat.models import checkpoint

  _at_least(args, 1, "batch_size", "image_size")
  outputs.check_output(args.out, "--out", (".npz",))
  embed.image_paths(args.images)  # a missing or empty folder before the backbone is read
  params, config = checkpoint.load(args.backbone, args.format, args.arch)
  features, paths = embed.embed_folder(params, config, args.images, args.image_size,
                                       args.batch_size)
  outputs.write_atomic(args.out, lambda f: np.savez(f, features=features,
                                                    paths=np.asarray(paths)), "wb")
  print(f"{args.out}: features {features.shape} for {len(paths)} images")


def _backbone_args(parser: argparse.ArgumentParser, required: bool) -> None:
  parser.add_argument("--format", choices=FORMATS, required=required,
                      help="weight layout of a .safetensors file: timm "
                           "(vit_small_patch16_224.dino) or hf (facebook/dino-vits16)")
  parser.add_argument("--arch", choices=ARCHS, required=required,
                      help="architecture of a .safetensors file")


def _add_reproduce(commands) -> None:
  """`smat reproduce`: the main job."""
  reproduce = commands.add_parser(
      "reproduce", help="main job on the offline benchmark: build data, describe it, sample "
                       "episodes, pre-train θ_pre, meta-train PMF, SoftMerge and SMAT, and "
                       "compare Pre and the three zero-shot in and out of distribution, draw "
                       "SMAT's masks and expert choice")
  reproduce.add_argument("--workdir", default="runs/demo", help="outputs (default: runs/demo)")
  reproduce.add_argument("--benchmark", default="offline", choices=("offline", "glyphs"),
                         help="offline (default): ID glyphs:id, emoji:id, icons:id, OOD "
                              "glyphs:ood, emoji:ood, fashion_mnist; glyphs: the glyph scripts "
                              "and fashion_mnist alone (no npm packages needed)")
  reproduce.add_argument("--config", default="glyphs_small",
                         help="episode-stream config (default: glyphs_small); --config.FIELD="
                              "VALUE overrides go to every stage config that has the field")
  _data_dir_arg(reproduce)
  reproduce.set_defaults(run=_cmd_reproduce, takes_overrides=True, compiles=True)


def _add_data(commands) -> None:
  """`smat data prepare|describe|show`."""
  data = commands.add_parser("data", help="prepare, describe and look at data")
  data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

  prepare = data_commands.add_parser(
      "prepare", help="build an offline benchmark source: glyphs (from the installed fonts), "
      "emoji and icons (from the npm packages bootstrap fetches); idempotent")
  prepare.add_argument("dataset", choices=["glyphs", "emoji", "icons", "fashion_mnist"])
  _data_dir_arg(prepare)
  prepare.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
  prepare.add_argument("--instances", type=int, default=20, help="images per class (default 20)")
  prepare.add_argument("--seed", type=int, default=0)
  prepare.add_argument("--scripts", default=None, help="glyphs: only these scripts, comma-separated")
  prepare.add_argument("--max-classes-per-script", type=int, default=None)
  prepare.add_argument("--emoji-sets", default=None,
                       help="emoji: these design teams, comma-separated (default: apple, google, "
                            "twitter, facebook)")
  prepare.add_argument("--max-classes-per-category", type=int, default=None)
  prepare.add_argument("--icon-sets", default=None,
                       help="icons: these Iconify icon sets (prefixes), comma-separated (default: "
                            "30 monochrome, openly licensed UI sets; docs/data.md)")
  prepare.add_argument("--min-sets", type=int, default=None,
                       help="icons: sets that must draw a concept for it to be a class (default 6)")
  prepare.add_argument("--max-classes", type=int, default=None,
                       help="icons: at most this many classes, those drawn by the most sets")
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
  show.add_argument("--split", default="test", choices=["pool", "train", "val", "test"])
  _sampler_args(show, queries=5)
  show.add_argument("--image-size", type=int, default=64)
  show.add_argument("--skip-corrupt", action="store_true")
  _data_dir_arg(show)
  show.set_defaults(run=_cmd_show)


def _add_pretrain(commands) -> None:
  """`smat pretrain`."""
  pretrain = commands.add_parser(
      "pretrain", help="pre-train a backbone: supervised, or DINO on an unlabeled pool",
      description="config.pretrain.objective=supervised (pretrain_glyphs): train a ViT with a "
                  "linear or cosine head on every training-class image; =dino "
                  "(pretrain_dino_glyphs): DINO's self-distillation on the images of "
                  "config.data.pool, no labels read, the teacher's backbone exported. Both "
                  "resume from <workdir>/checkpoints, export <workdir>/backbone and report "
                  "zero-shot ProtoNet accuracy (<workdir>/fewshot.json). Add "
                  "--config.FIELD=VALUE to override config fields.")
  pretrain.add_argument("--config", default="pretrain_glyphs",
                        help="packaged config name or file, [:variant] (default: "
                             "pretrain_glyphs)")
  pretrain.add_argument("--workdir", required=True,
                        help="checkpoints, logs and the exported backbone go here")
  _distributed_arg(pretrain)
  pretrain.set_defaults(run=_cmd_pretrain, takes_overrides=True, compiles=True)


def _add_meta_train(commands) -> None:
  """`smat meta-train`."""
  meta = commands.add_parser(
      "meta-train", help="meta-train SMAT, SoftMerge or PMF on top of a frozen backbone θ_pre",
      description="Meta-train the method of the config (config.method: smat = sparse "
                  "interpolated experts, softmerge = dense experts, pmf = dense ProtoNet "
                  "meta-tuning) on episodes of config.data.train. Resumes from "
                  "<workdir>/checkpoints; validates zero-shot after every epoch and keeps the "
                  "best one there too; metrics in <workdir>/metrics.jsonl and "
                  "<workdir>/tensorboard. Add --config.FIELD=VALUE to override config fields; "
                  "--config.experts.masks=random|map|influence|selfpruner|circuit replaces "
                  "SMAT's learned gates by a hand-designed mask strategy at the same τ.")
  meta.add_argument("--config", default="smat_glyphs",
                    help="packaged config name or file, [:variant] (default: smat_glyphs; "
                         "variants smoke, fullnoise, long)")
  meta.add_argument("--workdir", required=True, help="checkpoints and logs go here")
  _distributed_arg(meta)
  meta.set_defaults(run=_cmd_meta_train, takes_overrides=True, compiles=True)


def _add_evaluate(commands) -> None:
  """`smat evaluate`."""
  ev = commands.add_parser(
      "evaluate", help="few-shot accuracy of a meta-trained run (or θ_pre) on test classes",
      description="Few-shot evaluation of the best checkpoint of a `smat meta-train` workdir "
                  "(deterministic gates, router α, merged θ_task), or of a frozen backbone with "
                  "--method pre --backbone B: ProtoNet on θ_task as it is (zero-shot) or after "
                  "50 fine-tuning steps on the augmented support (--adapt, lr "
                  "searched per domain on the first 5 episodes, which are not reported). Every "
                  "method and mode sees the same episodes for a given seed. Writes JSON (per "
                  "domain: accuracy %, 95% CI, episodes, ways/shots, per-episode accuracies; ID "
                  "and OOD averages; method, config, seed, software versions) and prints a "
                  "markdown table.")
  ev.add_argument("--workdir", help="a `smat meta-train` workdir (its best checkpoint)")
  ev.add_argument("--method", choices=["run", "pre"], default="run",
                  help="run (default): the workdir's method; pre: a frozen backbone")
  ev.add_argument("--backbone", help="with --method pre: backbone dir or .safetensors")
  _backbone_args(ev, required=False)
  ev.add_argument("--domains", default=None, metavar="SPEC[,SPEC...]",
                  help="evaluated on their test classes (default: the run's benchmark, its "
                       "config's data.test: Meta-Dataset's 10 test sources, or glyphs:id, "
                       "glyphs:ood, fashion_mnist)")
  ev.add_argument("--id-domains", default=None, metavar="SPEC[,SPEC...]",
                  help="which of them count as in-distribution (default: those the run "
                       "meta-trained on)")
  ev.add_argument("--adapt", choices=ADAPT_MODES, default="zero-shot",
                  help="adaptation on the support before predicting: none (zero-shot), full "
                       "fine-tuning (AdamW, wd 0.01), LoRA (rank 8, α 32, dropout 0.1, query/"
                       "value, lr ×10), sparse (only the entries of SMAT's merged mask), or a δ "
                       "at density 0.1 masked by a sparsity strategy: random, map (magnitude "
                       "attention) or influence (PLATON), which warm up densely for 10 steps and "
                       "prune cubically until step 40, selfpruner (even per-block budgets of "
                       "|δ| at step 10), or circuit (the support's circuit by edge "
                       "attribution patching, rediscovered every 8 steps)")
  ev.add_argument("--episodes", type=int, default=600,
                  help="reported episodes per domain, after the --lr-search-episodes reserved "
                       "ones (reserved in every mode, so all modes see the same episodes)")
  ev.add_argument("--finetune-steps", type=int, default=50)
  ev.add_argument("--lr", type=float, default=None,
                  help="fine-tuning lr (default: searched per domain over --lrs)")
  ev.add_argument("--lrs", default=None, metavar="LR,LR,...",
                  help="lr grid of the search (default 0,1e-6,1e-5,1e-4,1e-3,1e-2,0.1)")
  ev.add_argument("--lr-search-episodes", type=int, default=5,
                  help="the first episodes of each domain, which pick the lr and are not "
                       "reported")
  ev.add_argument("--batch-size", type=int, default=None,
                  help="episodes per jitted call (default 8 zero-shot, 1 fine-tuned)")
  _sampler_args(ev, queries=15)
  ev.add_argument("--seed", type=int, default=0)
  ev.add_argument("--image-size", type=int, default=None,
                  help="default: the run's data.image_size (or the backbone's)")
  ev.add_argument("--test-resize-ratio", type=float, default=None,
                  help="test images resized to round(ratio · image size), then centre-cropped; "
                       "1: no crop (default: the run's data.test_resize_ratio, or 146/128)")
  ev.add_argument("--out", required=True, help="results JSON")
  ev.add_argument("--skip-corrupt", action="store_true",
                  help="skip unreadable images of folder: domains (counted) instead of failing")
  _data_dir_arg(ev)
  ev.set_defaults(run=_cmd_evaluate, compiles=True)


def _add_plot(commands) -> None:
  """`smat plot`."""
  plot = commands.add_parser(
      "plot", help="figures of a SMAT run: mask density per block/type/expert, expert choice",
      description="Writes mask_density.png (fraction of non-zero deterministic gates per block "
                  "and parameter type, for each expert), mask_density_expected.png (the same "
                  "for training samples: P(z ≠ 0)), mask_density.json, and "
                  "expert_choice.png/.json (the router's mean α per evaluation domain, one row "
                  "per domain of the SPECs), and specialisation.json (the mutual information "
                  "between domain and routing, and the Jaccard overlap of the experts' deployed "
                  "masks beside that of independent masks of the same densities).")
  plot.add_argument("--workdir", required=True, help="a SMAT or SoftMerge meta-train workdir")
  plot.add_argument("--out", required=True, help="directory for the figures")
  plot.add_argument("--checkpoint", choices=("best", "checkpoints"), default="best",
                    help="the run's checkpoint: best (what meta-test uses) or the final one")
  plot.add_argument("--domains", default=None, metavar="SPEC[,SPEC...]",
                    help="domains of the expert-choice map (default: the run's data.train)")
  plot.add_argument("--episodes", type=int, default=100, help="test episodes per domain")
  _sampler_args(plot, queries=15)
  plot.add_argument("--seed", type=int, default=0)
  _data_dir_arg(plot)
  plot.set_defaults(run=_cmd_plot, compiles=True)


def _add_import_backbone(commands) -> None:
  """`smat import-backbone`."""
  imp = commands.add_parser("import-backbone", help="DINO safetensors (timm/HF layout) → backbone dir")
  _backbone_args(imp, required=True)
  imp.add_argument("--weights", required=True, help="the .safetensors file")
  imp.add_argument("--out", required=True,
                   help="backbone directory to write (an existing backbone is replaced; any "
                        "other non-empty directory is refused)")
  imp.add_argument("--force", action="store_true",
                   help="replace --out even when it is a non-empty directory that is not a "
                        "backbone")
  imp.add_argument("--layer-norm-eps", type=float, default=None,
                   help="override LayerNorm epsilon (default: timm 1e-6, hf 1e-12)")
  imp.set_defaults(run=_cmd_import_backbone)


def _add_export(commands) -> None:
  """`smat export`."""
  exp = commands.add_parser(
      "export", help="a model as timm-layout safetensors: θ_pre, PMF's backbone, θ_task",
      description="Writes one safetensors file that timm's VisionTransformer(num_classes=0) "
                  "(or with --format hf, transformers' ViTModel) loads: a backbone directory "
                  "as it is; a PMF run's θ_pre + δ; a SMAT or SoftMerge run's θ_task for a "
                  "support set (--support: routed and masked as zero-shot meta-test does) or "
                  "its merged model at given expert weights (--alpha).")
  exp.add_argument("--workdir", default=None, help="a meta-train run")
  exp.add_argument("--checkpoint", choices=("best", "checkpoints"), default="best",
                   help="the run's checkpoint: best (what meta-test uses) or the final one")
  exp.add_argument("--backbone", default=None, help="a backbone directory (θ_pre)")
  exp.add_argument("--support", default=None, metavar="DIR",
                   help="SMAT/SoftMerge: a folder with one sub-folder of images per class")
  exp.add_argument("--alpha", default=None, metavar="uniform|W1,...,WM",
                   help="SMAT/SoftMerge: the merged model at these expert weights")
  exp.add_argument("--skip-corrupt", action="store_true",
                   help="leave unreadable images of --support out (counted) instead of failing")
  exp.add_argument("--format", choices=FORMATS, default="timm")
  exp.add_argument("--out", required=True, help="output .safetensors file")
  exp.set_defaults(run=_cmd_export, compiles=True)


def _add_embed(commands) -> None:
  """`smat embed`."""
  emb = commands.add_parser("embed", help="backbone CLS features of every image in a folder")
  emb.add_argument("--backbone", required=True, help="backbone directory or .safetensors file")
  _backbone_args(emb, required=False)
  emb.add_argument("--images", required=True, help="folder of images (searched recursively)")
  emb.add_argument("--out", required=True, help="output .npz with features [N, D] and paths")
  emb.add_argument("--image-size", type=int, default=None,
                   help="input size (default: the backbone's; others interpolate positions)")
  emb.add_argument("--batch-size", type=int, default=64)
  emb.set_defaults(run=_cmd_embed, compiles=True)

def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="smat", formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Sparse MetA-Tuning (SMAT): meta-learned sparse interpolated experts over a "
                  "frozen pre-trained ViT for few-shot classification.",
      epilog=__doc__.split("\n", 2)[2])
  parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for add in (_add_reproduce, _add_data, _add_pretrain, _add_meta_train, _add_evaluate,
              _add_plot, _add_import_backbone, _add_export, _add_embed):
    add(commands)
  return parser


def main(argv: list[str] | None = None) -> int:
  program = argv is None
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    rest, overrides = split_overrides(argv)
    args = build_parser().parse_args(rest)
    args.overrides = overrides
    check_overrides_taken(args)
    if getattr(args, "compiles", False):
      from smat import compile_cache

      compile_cache.enable(getattr(args, "data_dir", None))
    args.run(args)
  except SmatError as e:
    print(f"error: {e}", file=sys.stderr)
    return _failed_write(program) if type(e).__name__ == "WriteError" else 2
  except OSError as e:
    if e.errno not in _DISK_ERRNOS:
      raise
    where = f"{e.filename}: " if e.filename else ""
    print(f"error: {where}{e.strerror or e}; free space or fix the destination and run the same "
          f"command again (runs resume from their last checkpoint)", file=sys.stderr)
    return _failed_write(program)
  return 0


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """(other arguments, overrides as '--config.FIELD=VALUE'), taken out before argparse, which
  knows no field names. As in ml_collections' config_flags, `--config.FIELD=VALUE` and
  `--config.FIELD VALUE` are the same override."""
  rest, overrides = [], []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if not arg.startswith("--config."):
      rest.append(arg)
    elif "=" in arg:
      overrides.append(arg)
    elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
      overrides.append(f"{arg}={argv[i + 1]}")
      i += 1
    else:
      raise SmatError(f"{arg}: no value; give --config.FIELD=VALUE or --config.FIELD VALUE")
    i += 1
  return rest, overrides


def check_overrides_taken(args) -> None:
  """An override given to a command that runs no config would silently do nothing."""
  if args.overrides and not getattr(args, "takes_overrides", False):
    command = " ".join(c for c in (args.command, getattr(args, "data_command", None)) if c)
    raise SmatError(f"{args.overrides[0]}: `smat {command}` runs no config and takes no "
                    f"--config.FIELD overrides (reproduce, pretrain and meta-train do); drop it "
                    f"or use the command's own flags (smat {command} --help)")


def _failed_write(program: bool) -> int:
  """Exit code 2. As the program (not a library call), end the process now: after a failed
  write, background writers (orbax, TensorBoard) fail again in their exit handlers and would
  print their tracebacks after the one error line."""
  if program:
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)
  return 2


# A full, read-only or failing disk: the environment, not a bug (one line, not a traceback).
_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EIO, errno.EACCES})


if __name__ == "__main__":
  sys.exit(main())
