"""Teacher's view of MRPC augmented pairs vs the originals (docs/results.md, MRPC ablations)."""
import sys

import pandas as pd
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

aug_dir, teacher_dir = sys.argv[1], sys.argv[2]
rows = pd.read_parquet(f"{aug_dir}/train.parquet")
tok = AutoTokenizer.from_pretrained(f"{teacher_dir}/model")
model = AutoModelForSequenceClassification.from_pretrained(f"{teacher_dir}/model").eval()
sample_src = rows[rows.aug_id == 0].sample(300, random_state=0).source_idx
part = rows[rows.source_idx.isin(sample_src)]
probs = []
with torch.inference_mode():
    for i in range(0, len(part), 64):
        b = part.iloc[i:i + 64]
        enc = tok(list(b.text_a), list(b.text_b), truncation=True, max_length=128, padding=True, return_tensors="pt")
        probs += torch.softmax(model(**enc).logits, -1)[:, 1].tolist()
part = part.assign(p_pos=probs)
for name, g in (("original pairs", part[part.aug_id == 0]), ("augmented pairs", part[part.aug_id > 0])):
    print(f"{name}: n={len(g)}  gold positive {g.label.mean():.3f}  teacher P(positive) mean {g.p_pos.mean():.3f}  "
          f"teacher predicts positive {(g.p_pos > 0.5).mean():.3f}")
