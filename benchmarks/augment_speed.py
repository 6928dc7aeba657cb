"""Speed of TinyBERT augmentation: ours (batched) vs nlpaug vs a per-word reference, one run.

All three use the same masked LM (the real minilm-l6 encoder, BERT 6x384, loaded as
BertForMaskedLM: its MLM head is absent from the checkpoint and randomly initialised from a
fixed seed, so candidates are noise but every FLOP is real), the same real GloVe 6B 50d vectors
(400k words), the same first SST-2 train sentences, and N_a=20, p_t=0.4, K=15.

1. ours: ``kd_core.augment.TinyBertAugmenter`` (masked copies batched and length-sorted, head
   only at the masked positions, GloVe neighbours by batched matmul + topk, cached per word).
2. nlpaug: ``ContextualWordEmbsAug`` (substitute, top_k=K, aug_p=p_t, aug_max=None) on the
   same MLM saved to a folder, called on the whole list of sentences once per copy (its
   batched mode: it masks one chosen word at a time per sentence, batch_size 32).
3. per-word reference: TinyBERT's data_augmentation.py re-implemented straightforwardly with
   our word/candidate definitions: per word, re-tokenise the sentence, one MLM call (batch of
   1, full model, logits at every position) and an argsort of the vocabulary, or for a
   multi-piece word a full ``np.dot`` over the GloVe matrix plus an ``argsort``; no batching,
   no cache. It runs under ``torch.no_grad`` (the original does not, which is slower still).
   Its candidates are cross-checked against ours.

Ours is timed on all sentences (median of ``--repeats``). The baselines run on the first
``--reference-sentences`` / ``--nlpaug-sentences`` of the same sentences, in blocks of
``--block``, each block timed for ours and then for the baseline, so that background load on a
shared machine hits both alike; their ratio is baseline time / ours time on the same blocks
(ours loses a little batching efficiency on small blocks, so the ratio is conservative).

    .venv/bin/python benchmarks/augment_speed.py [--sentences 500] [--nlpaug-sentences 100]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

from kd_core.augment import AugmentConfig, MaskedLM, TinyBertAugmenter, load_word_vectors, sample_copies
from kd_core.augment.mlm import quiet_transformers
from kd_core.augment.tinybert import Slot, _seed_sequence
from kd_core.augment.words import is_eligible, match_case, split_words


class PerWordReference:
    """TinyBERT's reference algorithm, one MLM call / one GloVe scan per word, no batching."""

    def __init__(self, mlm: MaskedLM, vectors, config: AugmentConfig):
        self.model, self.tokenizer, self.mlm = mlm.model, mlm.tokenizer, mlm
        self.config = config
        normed = vectors.vectors / np.linalg.norm(vectors.vectors, axis=1, keepdims=True).clip(1e-12)
        self.emb_norm = normed.astype(np.float32)
        self.words = vectors.words
        self.vocab = vectors.index
        self.forward_calls = 0
        self.glove_scans = 0

    def _mlm_candidates(self, ids: list[int], position: int, word: str) -> list[str]:
        masked = list(ids)
        original = masked[position]
        masked[position] = self.tokenizer.mask_token_id
        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([masked])).logits[0, position]
        self.forward_calls += 1
        out = []
        for i in torch.argsort(logits, descending=True).tolist():
            s = self.mlm.id_strings[i]
            if s is not None and i != original and s.lower() != word.lower():
                out.append(s)
                if len(out) == self.config.k:
                    break
        return out

    def _glove_candidates(self, word: str) -> list[str]:
        row = self.vocab.get(word, self.vocab.get(word.lower()))
        if row is None:
            return []
        self.glove_scans += 1
        dist = np.dot(self.emb_norm, self.emb_norm[row])
        dist[row] = -np.inf
        out = []
        for i in np.argsort(-dist):
            w = self.words[i]
            if w.isascii() and w.isalpha() and w.lower() != word.lower():
                out.append(w)
                if len(out) == self.config.k:
                    break
        return out

    def candidates(self, sentence: str) -> list[Slot]:
        slots = []
        for start, end in split_words(sentence):
            word = sentence[start:end]
            if not is_eligible(word, self.config.skip_stopwords):
                continue
            enc = self.tokenizer(sentence, return_offsets_mapping=True)  # re-tokenised per word, as the reference
            pieces = [(t, s, e) for t, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s < end and e > start]
            if len(pieces) == 1 and pieces[0][1:] == (start, end):
                cands, source = self._mlm_candidates(enc["input_ids"], pieces[0][0], word), "mlm"
            else:
                cands, source = self._glove_candidates(word), "glove"
            slots.append(Slot(start, end, word, source, tuple(match_case(c, word) for c in cands)))
        return slots

    def augment(self, sentences: list[str], keys: list[int]) -> list[list[str]]:
        cfg = self.config
        return [
            sample_copies(s, self.candidates(s), _seed_sequence(cfg.seed, key, 0), cfg.n_aug, cfg.p_t)
            for s, key in zip(sentences, keys)
        ]


def count_forwards(model):
    counter = {"calls": 0, "rows": 0}

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        counter["calls"] += 1
        counter["rows"] += int(ids.shape[0])

    return counter, model.register_forward_pre_hook(hook, with_kwargs=True)


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=500)
    parser.add_argument("--nlpaug-sentences", type=int, default=50, help="subset for nlpaug (0: skip)")
    parser.add_argument("--reference-sentences", type=int, default=500, help="subset for the per-word reference (0: skip)")
    parser.add_argument("--n-aug", type=int, default=20)
    parser.add_argument("--p-t", type=float, default=0.4)
    parser.add_argument("--k", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3, help="the headline timings of ours are the median of this many runs")
    parser.add_argument("--block", type=int, default=25, help="sentences per interleaved block (ours vs a baseline)")
    parser.add_argument("--no-bf16", action="store_true", help="skip the extra bf16-autocast run of ours")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from kd_core.data.loaders import load_split

    data_dir = os.environ.get("KD_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data")
    frame = load_split("sst2", data_dir, "train")
    rows = frame.iloc[: args.sentences].reset_index(drop=True)
    warm = frame.iloc[args.sentences : args.sentences + 20].reset_index(drop=True)
    keys = rows["idx"].tolist()
    config = AugmentConfig(n_aug=args.n_aug, p_t=args.p_t, k=args.k, batch_size=args.batch_size)

    mlm = MaskedLM.load("minilm-l6", device="cpu", seed=0)
    vectors = load_word_vectors(None)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"{args.threads} threads, load average {os.getloadavg()[0]:.2f}")
    print(f"# MLM: minilm-l6 as {type(mlm.model).__name__} (head randomly initialised, seed 0); "
          f"GloVe {vectors.source} {len(vectors)}x{vectors.dim}; SST-2 train[:{len(rows)}]; "
          f"N_a={args.n_aug} p_t={args.p_t} K={args.k}")

    results: dict[str, dict] = {}

    def ours(frame, dtype: str = "float32"):
        mlm.dtype = dtype
        aug = TinyBertAugmenter(mlm, vectors, config)  # fresh: cold GloVe cache
        out = aug.augment_frame(frame)
        mlm.dtype = "float32"
        return aug, out

    def blocks(n: int, size: int):
        return [rows.iloc[i : min(i + size, n)] for i in range(0, n, size)]

    # warm-up of every path on sentences outside the measured ones
    ours(warm)
    PerWordReference(mlm, vectors, config).augment(warm["text_a"].tolist()[:5], warm["idx"].tolist()[:5])

    seconds, (aug, out) = timed(lambda: ours(rows), args.repeats)
    stats = aug.metadata()["stats"]
    results["ours"] = {"sentences": len(rows), "seconds": seconds, "mlm_forward_calls": stats["mlm_forward_calls"],
                       "mlm_sequences": stats["mlm_sequences"], "glove_words": stats["glove_words"],
                       "neighbour_queries": stats["neighbour_queries"], "rows_out": len(out)}
    print(f"ours: {len(rows)} sentences in {seconds:.2f}s (median of {args.repeats}); {stats['mlm_sequences']} masked "
          f"copies in {stats['mlm_forward_calls']} forward passes; {stats['glove_words']} GloVe words "
          f"({stats['neighbour_queries']} distinct)")

    if not args.no_bf16:
        seconds, _ = timed(lambda: ours(rows, "bfloat16"), args.repeats)
        results["ours, bf16 autocast"] = {"sentences": len(rows), "seconds": seconds}
        print(f"ours, bf16 autocast: {len(rows)} sentences in {seconds:.2f}s")

    if args.reference_sentences:
        # interleaved per block, so that background load on a shared machine hits both alike
        n = min(args.reference_sentences, len(rows))
        reference = PerWordReference(mlm, vectors, config)
        ref_seconds = ours_seconds = 0.0
        ref_out: list[list[str]] = []
        for block in blocks(n, args.block):
            start = time.perf_counter()
            ours(block)
            ours_seconds += time.perf_counter() - start
            start = time.perf_counter()
            ref_out += reference.augment(block["text_a"].tolist(), block["idx"].tolist())
            ref_seconds += time.perf_counter() - start
        ours_copies = [out[(out["source_idx"] == key) & (out["aug_id"] > 0)]["text_a"].tolist() for key in keys[:n]]
        identical = float(np.mean([a == b for a, b in zip(ref_out, ours_copies)]))
        results["per-word reference"] = {"sentences": n, "seconds": ref_seconds, "ours_seconds_same_sentences": ours_seconds,
                                         "mlm_forward_calls": reference.forward_calls, "glove_scans": reference.glove_scans,
                                         "sentences_with_identical_copies": identical}
        print(f"per-word reference: {n} sentences in {ref_seconds:.2f}s (ours on the same blocks, interleaved: "
              f"{ours_seconds:.2f}s); {reference.forward_calls} forward passes, {reference.glove_scans} GloVe scans; "
              f"copies identical to ours for {identical:.1%} of sentences")

    if args.nlpaug_sentences:
        import nlpaug.augmenter.word as naw

        from kd_core.augment.nlpaug_backend import install_transformers_shim

        install_transformers_shim()
        n = min(args.nlpaug_sentences, len(rows))
        with tempfile.TemporaryDirectory() as folder:
            with quiet_transformers():
                mlm.model.save_pretrained(folder)
                mlm.tokenizer.save_pretrained(folder)
                nl = naw.ContextualWordEmbsAug(
                    model_path=folder, model_type="bert", action="substitute", top_k=args.k, aug_p=args.p_t,
                    aug_max=None, device="cpu", force_reload=True, silence=True,
                )
            nl.augment(warm["text_a"].tolist()[:8])
            counter, hook = count_forwards(nl.model.model)
            nl_seconds = ours_seconds = 0.0
            for block in blocks(n, args.block):
                start = time.perf_counter()
                ours(block)
                ours_seconds += time.perf_counter() - start
                start = time.perf_counter()
                for _ in range(args.n_aug):  # nlpaug's batched mode: one call per copy over the list
                    nl.augment(block["text_a"].tolist())
                nl_seconds += time.perf_counter() - start
            hook.remove()
        results["nlpaug ContextualWordEmbsAug"] = {"sentences": n, "seconds": nl_seconds,
                                                   "ours_seconds_same_sentences": ours_seconds,
                                                   "mlm_forward_calls": counter["calls"], "mlm_sequences": counter["rows"]}
        print(f"nlpaug: {n} sentences in {nl_seconds:.2f}s (ours on the same blocks, interleaved: {ours_seconds:.2f}s); "
              f"{counter['rows']} masked sequences in {counter['calls']} forward passes")

    print()
    print("| implementation | sentences | seconds | sentences/s | this / ours (time, same sentences) |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        rate = r["sentences"] / r["seconds"]
        r["sentences_per_s"] = rate
        if "ours_seconds_same_sentences" in r:
            ratio = f"{r['seconds'] / r['ours_seconds_same_sentences']:.1f}x"
        elif name == "ours":
            ratio = "1x"
        else:
            ratio = f"{results['ours']['seconds'] / r['seconds']:.2f}x faster than ours fp32"
        r["ratio"] = ratio
        print(f"| {name} | {r['sentences']} | {r['seconds']:.2f} | {rate:.1f} | {ratio} |")
    print(f"\n# load average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
