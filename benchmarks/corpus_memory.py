"""Peak memory of corpus preparation as the input grows: 5 MB vs 25 MB of the Wikipedia sample.

Each measurement runs in a fresh subprocess (so peaks do not carry over) that loads the
``minilm-l6`` tokenizer, records its ru_maxrss (the fixed cost of Python + transformers +
tokenizer), then runs ``prepare_corpus`` on the first N files of ``wikipedia_sample/AA`` and
records ru_maxrss again. The files are symlinked into a temporary folder; nothing is copied.

``--naive`` adds a control run per size that holds every block in memory before writing one
Parquet file (what a non-streaming implementation does), to show the measurement can see growth.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/corpus_memory.py            # 5 and 25 files
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/corpus_memory.py --naive
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def data_dir() -> Path:
    return Path(os.environ.get("KD_DATA_DIR", REPO.parent / "shared" / "data"))


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(corpus: Path, out: Path, mode: str, max_seq_length: int, shard_rows: int) -> dict:
    from kd_core.models.registry import load_tokenizer

    tokenizer = load_tokenizer("minilm-l6")
    tokenizer("warm up the tokenizer", add_special_tokens=False)
    baseline = _maxrss_mb()
    started = time.perf_counter()
    if mode == "streaming":
        from kd_core.data.corpus import prepare_corpus

        manifest = prepare_corpus(corpus, tokenizer, out, max_seq_length, shard_rows=shard_rows, progress=False)
        blocks, tokens = manifest["num_blocks"], manifest["num_tokens"]
    else:  # the control: materialise every block, then write one table
        import pyarrow as pa
        import pyarrow.parquet as pq

        from kd_core.data.corpus import iter_sentence_documents, pack_sentence_blocks

        rows = list(pack_sentence_blocks(tokenizer, iter_sentence_documents(corpus), max_seq_length))
        out.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows), out / "all.parquet")
        blocks, tokens = len(rows), sum(len(r["input_ids"]) for r in rows)
    return {
        "baseline_mb": round(baseline, 1),
        "peak_mb": round(_maxrss_mb(), 1),
        "seconds": round(time.perf_counter() - started, 1),
        "blocks": blocks,
        "tokens": tokens,
    }


def measure(files: list[Path], mode: str, max_seq_length: int, shard_rows: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="kd-corpus-mem-") as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        for f in files:
            (corpus / f.name).symlink_to(f)
        cmd = [
            sys.executable, __file__, "--worker", str(corpus), "--out", str(Path(tmp) / "out"), "--mode", mode,
            "--max-seq-length", str(max_seq_length), "--shard-rows", str(shard_rows),
        ]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode:
            raise SystemExit(f"worker failed:\n{done.stderr}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
    result["input_mb"] = round(sum(f.stat().st_size for f in files) / 1e6, 1)
    result["files"] = len(files)
    result["mode"] = mode
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, nargs="+", default=[5, 25], help="how many wiki_NN files per run")
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--shard-rows", type=int, default=8192)
    parser.add_argument("--naive", action="store_true", help="also run the in-memory control")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="streaming", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.out, args.mode, args.max_seq_length, args.shard_rows)))
        return
    files = sorted((data_dir() / "wikipedia_sample" / "AA").glob("wiki_*"))
    if len(files) < max(args.files):
        raise SystemExit(f"need {max(args.files)} files under {data_dir()}/wikipedia_sample/AA, found {len(files)}")
    modes = ["streaming"] + (["naive"] if args.naive else [])
    print(f"max_seq_length={args.max_seq_length} shard_rows={args.shard_rows}; ru_maxrss of a fresh subprocess per run")
    header = (f"{'mode':<10} {'files':>5} {'input MB':>8} {'blocks':>7} {'tokens':>10} {'baseline MB':>11} {'peak MB':>8} "
              f"{'peak-baseline':>13} {'s':>6}")
    print(header)
    results = []
    for mode in modes:
        for n in args.files:
            r = measure(files[:n], mode, args.max_seq_length, args.shard_rows)
            results.append(r)
            print(
                f"{r['mode']:<10} {r['files']:>5} {r['input_mb']:>8} {r['blocks']:>7} {r['tokens']:>10} "
                f"{r['baseline_mb']:>11} {r['peak_mb']:>8} {r['peak_mb'] - r['baseline_mb']:>13.1f} {r['seconds']:>6}",
                flush=True,
            )
    for mode in modes:
        runs = [r for r in results if r["mode"] == mode]
        if len(runs) >= 2:
            small, large = runs[0], runs[-1]
            print(
                f"{mode}: input x{large['input_mb'] / small['input_mb']:.1f} -> peak RSS "
                f"{small['peak_mb']} -> {large['peak_mb']} MB (x{large['peak_mb'] / small['peak_mb']:.2f}), "
                f"above baseline {small['peak_mb'] - small['baseline_mb']:.1f} -> {large['peak_mb'] - large['baseline_mb']:.1f} MB"
            )


if __name__ == "__main__":
    main()
