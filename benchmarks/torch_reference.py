"""The same ViT fwd+bwd in PyTorch/timm, for comparison with backbone_throughput (GPU only).

  python benchmarks/torch_reference.py --arch vit_small_patch16_224 --image-size 128 --batch 256

torch and timm are not smat dependencies; this runs where they are installed. The loss is the
one backbone_throughput uses (mean squared CLS feature), with and without bf16 autocast.
"""

import argparse
import time

import timm
import torch


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--arch", default="vit_small_patch16_224")
  parser.add_argument("--image-size", type=int, default=128)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args()
  model = timm.create_model(args.arch, pretrained=False, num_classes=0,
                            img_size=args.image_size).cuda()
  images = torch.randn(args.batch, 3, args.image_size, args.image_size, device="cuda")
  for bf16 in (False, True):
    def step():
      with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        loss = model(images).float().pow(2).mean()
      loss.backward()
    for _ in range(3):
      step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.repeats):
      step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.repeats
    print(f"timm {args.arch} {args.image_size}px batch {args.batch} bf16-autocast={bf16}: "
          f"fwd+bwd {args.batch / seconds:.0f} images/s")


if __name__ == "__main__":
  main()
