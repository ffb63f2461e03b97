"""bench.centralised (pooled + local-only, non-DP) on the full plan's federation of each seed, at the working tree's code."""
import json, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, "../..")
from pathlib import Path
from simulations.bench import PLANS, centralised
from common.site_files import site_folders
from simulations.federation import build_federation
plan = PLANS["full"]
for seed in map(int, sys.argv[1:]):
    sites = site_folders(build_federation(Path.home() / ".cache" / "fedseg", plan.sites, seed, plan.size))
    r = centralised(plan, sites, seed)
    json.dump(r, open(f"pooled/seed{seed}.json", "w"), indent=1)
    print(seed, "pooled", round(r["pooled"]["mean_dice"], 3), r["pooled"].get("mean_dice_per_class"),
          {k: round(v["mean_dice"], 3) for k, v in r["local_only"].items()}, flush=True)
