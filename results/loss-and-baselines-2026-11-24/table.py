import json, glob, os
rows = []
for f in sorted(glob.glob("runs/*.json")):
    d = json.load(open(f)); a = d["args"]; h = d["hist"]; last = h[-1]
    cls = [k for k in last if k not in ("round", "sigma", "steps", "loss", "t")]
    variant = a["loss"] + ("" if a["loss"] != "repo" else f" (weights 1/{a['first_w']:g}/{a['lesion_w']:g})")
    if a.get("dice_w"): variant += f", region Dice weights {a['dice_w']}"
    if a.get("pos_w"): variant += f", BCE pos_weight {a['pos_w']}"
    if a.get("region_w"): variant += f", region weights {a['region_w']}"
    if a.get("present"): variant += ", Dice only of present regions"
    if a.get("spp"): variant += f", {a['spp']} slices/patient"
    if a.get("server_momentum"): variant += f", server momentum {a['server_momentum']:g}"
    if a.get("set"): variant += ", " + ", ".join(a["set"])
    eps = "∞" if a["eps"] == float("inf") else f"{a['eps']:g}"
    fg = sum(sum(last[c]) / len(last[c]) for c in cls) / len(cls)
    learned = "yes" if all(x >= 0.1 for x in last[cls[-1]]) else "no"
    rows.append(f"| {os.path.basename(f)[:-5]} | {a['seed']} | {eps} | {variant} | {last['round']} | "
                + " | ".join(" / ".join(f"{x:.2f}" for x in last[c]) for c in cls) + f" | {fg:.2f} | {learned} |")
print("| run | data + init seed | ε | loss / variant | round | organ (site 1 / 2 / 3) | lesion | foreground mean | lesion ≥ 0.1 at every site |")
print("|---|---|---|---|---|---|---|---|---|")
print("\n".join(rows))
