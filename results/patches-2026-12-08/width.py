import time, torch, sys
from monai.networks.nets import BasicUNet
from torch.func import functional_call, grad_and_value, vmap
from common.losses import patient_loss
torch.set_num_threads(1)
def net(f):
    return BasicUNet(spatial_dims=2, in_channels=1, out_channels=3, features=f, act=("LeakyReLU", {"negative_slope": 0.1, "inplace": False}),
                     norm=("group", {"num_groups": 4}), upsample="nontrainable", dropout=0.0)
loss_fn = patient_loss([1, 2, 40])
x = torch.randn(16, 4, 1, 64, 64); y = torch.nn.functional.one_hot(torch.randint(0, 3, (16, 4, 64, 64)), 3).movedim(-1, 2).float()
for f in [(8, 16, 32, 64, 128, 8), (16, 32, 64, 128, 256, 16), (12, 24, 48, 96, 192, 12)]:
    m = net(f); params = {n: p.detach() for n, p in m.named_parameters()}; bufs = {n: b for n, b in m.named_buffers()}
    def lo(p, i, o): return loss_fn(functional_call(m, (p, bufs), (i,)), o)
    g = vmap(grad_and_value(lo), in_dims=(None, 0, 0), chunk_size=4)
    g(params, x, y)
    ts = []
    for _ in range(3):
        t = time.perf_counter(); g(params, x, y); ts.append(time.perf_counter() - t)
    m.eval()
    with torch.inference_mode():
        xi = torch.randn(32, 1, 64, 64); m(xi); t = time.perf_counter(); m(xi); inf = time.perf_counter() - t
    print(f, sum(p.numel() for p in m.parameters()), f"DP step {min(ts):.2f} s", f"inference {32/inf:.0f} patches/s", flush=True)
