"""Extra statistics over the meta-kd report's scores.parquet: collapsed runs and robust averages."""
import sys

import pandas as pd

scores = pd.read_parquet(sys.argv[1])
students = scores[scores.role == "student"].copy()
students["collapsed"] = students.score <= 55.0  # 2 balanced classes: <= 55% is chance level
print("## Collapsed student runs (dev accuracy <= 55%, i.e. chance)\n")
print("| fraction | single | mixed | meta |\n|---|---|---|---|")
for fraction in sorted(students.fraction.unique(), reverse=True):
    at = students[students.fraction == fraction]
    cells = [f"{int(at[at.method == m].collapsed.sum())} / {int((at.method == m).sum())}" for m in ("single", "mixed", "meta")]
    print(f"| {fraction:g} | " + " | ".join(cells) + " |")
print("\n## Median over domains and seeds, and mean without collapsed runs\n")
print("| fraction | single median | mixed median | meta median | single mean* | mixed mean* | meta mean* |\n|---|---|---|---|---|---|---|")
for fraction in sorted(students.fraction.unique(), reverse=True):
    at = students[students.fraction == fraction]
    med = [f"{at[at.method == m].score.median():.2f}" for m in ("single", "mixed", "meta")]
    ok = at[~at.collapsed]
    mean = [f"{ok[ok.method == m].score.mean():.2f}" for m in ("single", "mixed", "meta")]
    print(f"| {fraction:g} | " + " | ".join(med + mean) + " |")
print("\n\\* mean over the runs that did not collapse.")
