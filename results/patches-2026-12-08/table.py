"""One line per run folder: final foreground Dice, per-site organ/lesion Dice, HD95, ε, wall time."""
import json, sys, statistics
from pathlib import Path
rows = {}
for d in sys.argv[1:]:
    h = json.loads((Path(d) / "history.json").read_text())
    last = [r for r in h["rounds"] if r.get("dice") is not None][-1]
    sites = sorted(last["sites"].items())
    per = " ".join(f"{'/'.join(f'{x:.2f}' for x in s['val_dice_per_class'])}" for _, s in sites)
    hd = statistics.mean(s["val_hd95_mm"] for _, s in sites if s.get("val_hd95_mm") is not None)
    eps = max(float(s.get("epsilon") or 0) for r in h["rounds"] for s in r["sites"].values())
    print(f"{Path(d).name:28s} round {last['round']:2d} Dice {last['dice']:.3f} | per site {per} | HD95 {hd:5.1f} mm | ε {eps:.2f} | {h['wall_time_s']:.0f} s | {h['config']['classes']} sp {h['config'].get('spacing')} px {h['config']['image-size']}")
    rows.setdefault(Path(d).name.rsplit("-s", 1)[0], []).append(last["dice"])
for k, v in rows.items():
    print(f"{k}: {statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else float('nan'):.3f} (n={len(v)})")
