"""Issue 14: AIVA with the clustering round's embedding pass in bfloat16 vs float32 (ixi-sim 2 mm, 1000 steps, code 665251b)."""
import csv, glob, json, sys
import numpy as np
RULES = ["source_best", "source_lowest", "last", "target_entropy", "target_im", "target_agreement"]
metric = sys.argv[1] if len(sys.argv) > 1 else "surface_dice_1mm"
def mean(vols):
    t = [v[metric] for v in vols if v["set"] == "target test" and v.get(metric) is not None]
    return 100 * float(np.mean(t))
def load(pattern):
    return {(r["method"], r["seed"]): r for f in glob.glob(pattern) for r in map(json.loads, filter(str.strip, open(f)))}
f32, bf16 = load("/work/results/ixi_sim_1000_seed?/results.jsonl"), load("/work/results/ixi_sim_1000_bf16_seed?/results.jsonl")
seeds = sorted(s for (m, s) in bf16 if m == "aiva")
print(f"metric: {metric} (target test, 20 volumes, %)\n")
print("| seed | AdaBN | clustering precision | " + " | ".join(RULES) + " | default rule - AdaBN |")
print("|---|---|---|" + "---|" * (len(RULES) + 1))
margin = {"float32": [], "bfloat16": []}; diff = {r: [] for r in RULES}
for s in seeds:
    adabn = mean(f32[("adabn", s)]["volumes"])
    vals = {}
    for name, recs in (("float32", f32), ("bfloat16", bf16)):
        v = {r: mean(recs[("aiva", s)]["rule_volumes"][r]) for r in RULES}; vals[name] = v
        margin[name].append(v["target_agreement"] - adabn)
        print(f"| {s} | {adabn:.2f} | {name} | " + " | ".join(f"{v[r]:.2f}" for r in RULES) + f" | {v['target_agreement'] - adabn:+.2f} |")
    for r in RULES:
        diff[r].append(vals["bfloat16"][r] - vals["float32"][r])
print()
for name, g in margin.items():
    print(f"{name}: default rule minus AdaBN, mean {np.mean(g):+.2f} +/- {np.std(g, ddof=1) if len(g) > 1 else 0:.2f} ({', '.join(f'{x:+.2f}' for x in g)})")
print("\n| rule | bfloat16 - float32, mean over seeds | per seed |\n|---|---|---|")
for r in RULES:
    print(f"| {r} | {np.mean(diff[r]):+.2f} | {', '.join(f'{x:+.2f}' for x in diff[r])} |")
print("\nclustering round, embedding pass seconds per round (1800 + 1800 slices; machine load differs between the runs):")
for name, root in (("float32", "/work/results/ixi_sim_1000_seed{}"), ("bfloat16", "/work/results/ixi_sim_1000_bf16_seed{}")):
    for s in seeds:
        (f,) = glob.glob(root.format(s) + f"/runs/*__aiva__seed{s}_k12__steps1000/clustering_stats.csv")
        rows = list(csv.DictReader(open(f)))
        print(f"  {name} seed {s}: embed " + " / ".join(f"{float(r['time_embed']):.0f}" for r in rows) + " s; t-SNE " + " / ".join(f"{float(r['time_tsne']):.0f}" for r in rows) + " s")
