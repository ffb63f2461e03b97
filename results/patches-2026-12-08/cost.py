"""DP-SGD vs plain SGD (one epoch each, fresh processes, 1 thread) and predict's inference speed, with the bench's own functions."""
import json, sys
from pathlib import Path
from simulations.bench import PLANS, dp_cost, inference_speed
from simulations.federation import build_federation
from common.site_files import site_folders
if __name__ == "__main__":  # dp_cost spawns processes
    root = build_federation(Path.home() / ".cache" / "fedseg", 3, 0, "default")
    out = {"dp_cost": [dp_cost(PLANS["full"], str(site_folders(root)[0]), 0) for _ in range(int(sys.argv[1]))], "inference": inference_speed()}
    print(json.dumps(out, default=float, indent=1))
