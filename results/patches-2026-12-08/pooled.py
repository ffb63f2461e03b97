"""Pooled and local-only baselines of `fedseg bench` (simulations.bench.centralised: non-DP, the bench's
plan, each seed's validation split), for one seed; JSON on stdout."""
import json, sys, time
from pathlib import Path
from simulations.bench import PLANS, centralised
from simulations.federation import build_federation
from common.site_files import site_folders
seed = int(sys.argv[1])
root = build_federation(Path.home() / ".cache" / "fedseg", 3, seed, "default")
started = time.time()
out = centralised(PLANS["full"], [str(s) for s in site_folders(root)], seed)
out["wall_s"] = time.time() - started
print(json.dumps(out, default=float))
