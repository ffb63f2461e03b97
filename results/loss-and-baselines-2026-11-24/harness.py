"""In-process 3-site FedAvg over the real client.training code (OS-seeded DP noise and sampling), with
loss variants patched in. Run from this folder: `python harness.py --name NAME --seed S [options]`.
--loss repo    : softmax Dice+CE, class weights 1 / --first_w / --lesion_w (main's default: 1 / 2 / 40)
--loss regions : nnU-Net region training, region k = classes >= k (organ∪lesion, lesion), sigmoid
                 Dice+BCE on output channels 1.., decoded as the innermost region with logit > 0
--loss nested  : the same regions, with region logits = differences of consecutive class scores, so
                 the plain argmax decodes them (no change to prediction)
--server_momentum: FedAvgM on the server; --spp: slices per sampled patient; --set key=value: run config."""
import argparse, json, time, copy, os, sys
import numpy as np, torch
import torch.nn.functional as F
torch.set_num_threads(1)
sys.path.insert(0, os.environ.get("FEDSEG_REPO", "../.."))  # the repo whose client/training.py runs
import client.training as T
from common.dataset import load_site, Preprocessing
from common.config import TrainSettings, run_config
from client.site_policy import SitePolicy
from common.model import build_model
from monai.losses import DiceLoss

p = argparse.ArgumentParser()
p.add_argument("--name", required=True)
p.add_argument("--rounds", type=int, default=12)
p.add_argument("--eps", type=float, default=8.0)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--set", action="append", default=[])
p.add_argument("--root", default=os.path.expanduser("~/.cache/fedseg/federation-v4-default-3sites-50to60patients-seed{seed}"))
p.add_argument("--classes", default="organ,lesion")
p.add_argument("--loss", default="repo")
p.add_argument("--spp", type=int, default=0)
p.add_argument("--lesion_w", type=float, default=40.0)
p.add_argument("--first_w", type=float, default=2.0)
p.add_argument("--server_momentum", type=float, default=0.0)
p.add_argument("--dice_w", default="")  # nested: weights of the regions' Dice terms (BCE unweighted)
p.add_argument("--pos_w", default="")  # nested: BCE pos_weight per region
p.add_argument("--present", action="store_true")
p.add_argument("--region_w", default="")  # comma weights per region for dice+bce
a = p.parse_args()
root = a.root.format(seed=a.seed)
classes = ("background", *a.classes.split(","))
C = len(classes)
pol = SitePolicy()
pre = Preprocessing(64, (-160.0, 240.0))
import glob as G
sites = [load_site(f, classes, pre, pol.validation_fraction, b"") for f in sorted(G.glob(f"{root}/*")) if os.path.isdir(f)]
print("train/val patients", [(len(s.train), len(s.validation)) for s in sites], flush=True)
spp = a.spp or pol.slices_per_patient

if a.loss == "repo":  # the softmax Dice+CE with 1, first_w .. lesion_w weights (main until 2026-11-24)
    from monai.losses import DiceCELoss
    _w = torch.tensor([1.0, a.first_w, a.lesion_w][:C]) if C == 3 else torch.ones(C)
    T.patient_loss = lambda _=None: DiceCELoss(softmax=True, batch=True, include_background=False, weight=_w)
if a.loss == "nested":  # the product's parametrisation: region logits are differences of class scores; argmax decodes
    class Nested(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dice = DiceLoss(sigmoid=True, batch=True, reduction="none")
            self.register_buffer("w", torch.tensor([float(x) for x in a.dice_w.split(",")]) if a.dice_w else torch.ones(C - 1))
        def forward(self, scores, onehot):
            logits = scores[:, 1:] - scores[:, :-1]
            regions = onehot.flip(1).cumsum(1).flip(1)[:, 1:]
            d = self.dice(logits, regions).reshape(-1)
            pw = torch.tensor([float(x) for x in a.pos_w.split(",")]).view(-1, 1, 1) if a.pos_w else None
            return (d * self.w).sum() / self.w.sum() + F.binary_cross_entropy_with_logits(logits, regions, pos_weight=pw)
    T.patient_loss = lambda num_classes=3: Nested()
if a.loss == "regions":
    rw = torch.tensor([float(x) for x in a.region_w.split(",")]) if a.region_w else torch.ones(C - 1)
    class RegionLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dice = DiceLoss(sigmoid=True, batch=True, reduction="none")
            self.register_buffer("w", rw)
        def forward(self, x, onehot):
            # onehot [S, C, H, W] -> regions [S, C-1, H, W]: region k = classes >= k
            regions = onehot[:, 1:].flip(1).cumsum(1).flip(1)
            z = x[:, 1:]
            d = self.dice(z, regions).reshape(-1)
            if a.present:  # Dice only for the regions this patient has; BCE alone says "none here"
                d = d * (regions.sum(dim=(0, 2, 3)) > 0).float()
            b = F.binary_cross_entropy_with_logits(z, regions, reduction="none").mean(dim=(0, 2, 3))
            return ((d + b) * self.w).sum() / self.w.sum()
    T.patient_loss = lambda num_classes=3: RegionLoss()
    @torch.no_grad()
    def native_labels(model, image, grid, device, batch=32):
        logits = T_inf.slice_logits(model, image, device, batch)
        out = []
        for chunk in logits.split(batch):
            z = F.interpolate(chunk, size=grid, mode="bilinear", align_corners=False)[:, 1:] > 0
            lab = torch.zeros(z.shape[0], *z.shape[2:], dtype=torch.uint8)
            for k in range(z.shape[1]):
                lab[z[:, k]] = k + 1
            out.append(lab)
        return torch.cat(out).numpy()
    import common.inference as T_inf
    T.native_labels = native_labels

torch.manual_seed(a.seed)
glob = build_model(C)
over = {"num-server-rounds": a.rounds, "target-epsilon": a.eps}
for kv in a.set:
    k, v = kv.split("=", 1); over[k] = type(run_config({})[k])(v)
hist = []; t0 = time.time(); vel = {}
for r in range(1, a.rounds + 1):
    states, weights, tl = [], [], []
    for d in sites:
        cfg = run_config(over); cfg["server-round"] = r
        st = TrainSettings.from_config(cfg)
        n = pol.planned_count(len(d.train), st.private)
        plan = T.plan_round(st, n, pol.delta)
        m = copy.deepcopy(glob)
        tl.append(T.train_round(m, d.train, st, plan, spp, torch.device("cpu")))
        states.append(m.state_dict()); weights.append(n)
    tot = sum(weights)
    avg = {k: sum(w * s[k] for w, s in zip(weights, states)) / tot for k in states[0]}
    if a.server_momentum:
        old = glob.state_dict()
        vel = {k: a.server_momentum * vel.get(k, 0) + (avg[k] - old[k]) for k in avg}
        avg = {k: old[k] + vel[k] for k in avg}
    glob.load_state_dict(avg)
    ev = [T.evaluate(glob, d, C, torch.device("cpu")) for d in sites]
    rec = {"round": r, "sigma": round(plan.noise_multiplier, 3), "steps": plan.steps, "loss": [round(x, 3) for x in tl],
           **{cl: [round(e[f"dice-class{c}"], 3) for e in ev] for c, cl in enumerate(classes[1:], 1)}, "t": round(time.time() - t0)}
    hist.append(rec); print(json.dumps(rec), flush=True)
json.dump({"args": vars(a), "hist": hist}, open(f"runs/{a.name}.json", "w"))
