import time, torch, timm
m = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=128).cuda()
x = torch.randn(256, 3, 128, 128, device="cuda")
for amp in (False, True):
  def step():
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
      loss = m(x).float().pow(2).mean()
    loss.backward()
  for _ in range(3): step()
  torch.cuda.synchronize(); t = time.perf_counter()
  for _ in range(10): step()
  torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 10
  print(f"torch timm vit_s16 128px batch 256 bf16-autocast={amp}: fwd+bwd {256/dt:.0f} img/s")
