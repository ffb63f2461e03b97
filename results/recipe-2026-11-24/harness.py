"""In-process 3-site FedAvg over the REAL client.training code (current main), OS-seeded DP noise.
--variant current : as main (sample q=B/N_binned over N patients, divide by q*N_binned)
--variant C       : sample at B/N, account at B/N_binned, divide by B (expected batch exact, no count leak)
--variant old     : as before the leak fix (divide by q*N)"""
import argparse, json, time, copy, sys, dataclasses
import numpy as np, torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[sys.argv.index("--repo") + 1] if "--repo" in sys.argv else "/work/main")
import client.training as T
from common.dataset import load_site, Preprocessing
from common.config import TrainSettings, run_config
from client.site_policy import SitePolicy
from common.model import build_model

p = argparse.ArgumentParser()
p.add_argument("--name", required=True)
p.add_argument("--repo", default="/work/main")
p.add_argument("--variant", default="current")
p.add_argument("--rounds", type=int, default=12)
p.add_argument("--eps", type=float, default=8.0)
p.add_argument("--torch_seed", type=int, default=0)
p.add_argument("--set", action="append", default=[])
p.add_argument("--root", default="/root/.cache/fedseg/federation-v4-default-3sites-50to60patients-seed0")
p.add_argument("--opt", default="sgd")
p.add_argument("--loss", default="repo")
p.add_argument("--spp", type=int, default=0)
p.add_argument("--lesion_w", type=float, default=0)  # extra run-config key=value
a = p.parse_args()

root = a.root
classes = ("background", "organ", "lesion")
pol = SitePolicy()
sites = [load_site(f"{root}/site-0{i}", classes, Preprocessing(64, (-160.0, 240.0)), pol.validation_fraction, b"") for i in (1, 2, 3)]
print("train/val patients", [(len(s.train), len(s.validation)) for s in sites], flush=True)

orig_train = T.train_round
def train_variant(model, patients, st, plan, spp, dev):
    if a.variant == "current":
        return orig_train(model, patients, st, plan, spp, dev)
    if a.variant == "C":
        q = plan.sample_rate * plan.patients / len(patients)
        return orig_train(model, patients, st, dataclasses.replace(plan, sample_rate=q, patients=len(patients)), spp, dev)
    if a.variant == "old":
        return orig_train(model, patients, st, dataclasses.replace(plan, patients=len(patients)), spp, dev)
    raise ValueError(a.variant)

if a.opt == "adam":
    torch.optim.SGD = lambda params, lr, momentum: torch.optim.Adam(params, lr=lr)
elif a.opt == "adamw":
    torch.optim.SGD = lambda params, lr, momentum: torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
spp = a.spp or pol.slices_per_patient
import common.losses as L
L.LAST_FOREGROUND_WEIGHT = a.lesion_w or 20.0  # the 2026-11-23 recipe unless asked
if a.loss == "present":
    from monai.losses import DiceLoss
    import common.losses as L
    class PresentDiceCE(torch.nn.Module):
        """Weighted soft Dice over the foreground classes PRESENT in this patient's labels + weighted CE."""
        def __init__(self, w):
            super().__init__()
            self.dice = DiceLoss(softmax=True, batch=True, include_background=False, reduction="none")
            self.register_buffer("w", w)
        def forward(self, x, y):
            d = self.dice(x, y).reshape(-1)  # [C-1]
            present = (y[:, 1:].sum(dim=(0, 2, 3)) > 0).float()
            wf = self.w[1:] * present
            dice = (d * wf).sum() / len(wf)  # as MONAI: weighted, mean over the foreground classes; absent ones add 0
            return dice + torch.nn.functional.cross_entropy(x, y, weight=self.w)  # soft-target CE, as MONAI
    T.patient_loss = lambda num_classes=3: PresentDiceCE(L.class_weights(num_classes))
torch.manual_seed(a.torch_seed)
glob = build_model(3)
over = {"num-server-rounds": a.rounds, "target-epsilon": a.eps}
for kv in a.set:
    k, v = kv.split("=", 1); over[k] = type(run_config({})[k])(v)
hist = []; t0 = time.time()
for r in range(1, a.rounds + 1):
    states, weights, tl = [], [], []
    for d in sites:
        cfg = run_config(over); cfg["server-round"] = r
        st = TrainSettings.from_config(cfg)
        plan = T.plan_round(st, pol.binned_down(len(d.train)), pol.delta)
        m = copy.deepcopy(glob)
        tl.append(train_variant(m, d.train, st, plan, spp, torch.device("cpu")))
        states.append(m.state_dict()); weights.append(pol.binned(len(d.train)))
    tot = sum(weights)
    glob.load_state_dict({k: sum(w * s[k] for w, s in zip(weights, states)) / tot for k in states[0]})
    ev = [T.evaluate(glob, d, 3, torch.device("cpu")) for d in sites]
    rec = {"round": r, "sigma": round(plan.noise_multiplier, 3), "steps": plan.steps, "loss": [round(x, 3) for x in tl],
           "organ": [round(e["dice-class1"], 3) for e in ev], "lesion": [round(e["dice-class2"], 3) for e in ev], "t": round(time.time() - t0)}
    hist.append(rec); print(json.dumps(rec), flush=True)
json.dump({"args": vars(a), "hist": hist}, open(f"/tmp/recipe3/results/{a.name}.json", "w"))
