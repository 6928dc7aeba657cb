"""The MLflow pyfunc behind every registered model (MLflow "models from code": this file is copied
into the model, nothing is pickled).

Input: a DataFrame with ``text_a`` (and ``text_b`` for pair tasks), or ``sentence``/``text``.
Output: for a model with a task head, ``label`` (the id2label name), ``label_id`` and
``score`` (the softmax probability of that label; the raw value for a regression head); for a
bare encoder (a general student), ``embedding``, the mask-mean of the last hidden states.
The weights and tokenizer are the stage's ``save_pretrained`` dir, logged as the ``model_dir``
artifact, so ``from_pretrained`` on that folder gives the same model.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel

TEXT_COLUMNS = (("text_a", "text_b"), ("sentence1", "sentence2"), ("sentence", None), ("text", None))


class TextModel(PythonModel):
    batch_size = 32

    def load_context(self, context):
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

        path = context.artifacts["model_dir"]
        config = AutoConfig.from_pretrained(path)
        self.has_head = bool(getattr(config, "architectures", None)) and any(
            "SequenceClassification" in arch for arch in config.architectures)
        loader = AutoModelForSequenceClassification if self.has_head else AutoModel
        self.model = loader.from_pretrained(path).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.max_length = min(512, getattr(config, "max_position_embeddings", 512))
        self.torch = torch

    def _texts(self, frame):
        for first, second in TEXT_COLUMNS:
            if first in frame.columns:
                pairs = second is not None and second in frame.columns and frame[second].notna().any()
                return list(frame[first].astype(str)), (list(frame[second].astype(str)) if pairs else None)
        raise ValueError(f"input needs a text column: text_a (and text_b), sentence1/sentence2, sentence or text; "
                         f"got {list(frame.columns)}")

    def predict(self, context, model_input, params=None):
        import pandas as pd

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        first, second = self._texts(frame)
        rows = []
        for start in range(0, len(first), self.batch_size):
            batch = self.tokenizer(first[start:start + self.batch_size],
                                   second[start:start + self.batch_size] if second else None,
                                   padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            with self.torch.no_grad():
                out = self.model(**batch)
            if not self.has_head:
                mask = batch["attention_mask"].unsqueeze(-1).float()
                pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1)
                rows += [{"embedding": vector.tolist()} for vector in pooled]
                continue
            logits = out.logits
            if logits.shape[-1] == 1:  # regression (STS-B)
                rows += [{"label": "score", "label_id": 0, "score": float(v)} for v in logits[:, 0]]
                continue
            probs = logits.softmax(-1)
            ids = probs.argmax(-1)
            names = self.model.config.id2label
            rows += [{"label": names.get(int(i), str(int(i))), "label_id": int(i), "score": float(p[i])}
                     for i, p in zip(ids, probs)]
        return pd.DataFrame(rows)


mlflow.models.set_model(TextModel())
