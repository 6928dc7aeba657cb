"""Plain text / WikiExtractor corpora packed into token blocks for general distillation.

Streams: files are read line by line and blocks are yielded as they fill, so memory stays
bounded whatever the corpus size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator


class CorpusError(ValueError):
    pass


def corpus_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CorpusError(f"corpus path {path} does not exist; pass a text file or a folder of text files")
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise CorpusError(f"corpus folder {path} holds no files")
    return files


def iter_documents(path: str | Path) -> Iterator[list[str]]:
    """Documents as lists of non-empty lines.

    WikiExtractor output: ``<doc ...>`` / ``</doc>`` lines delimit documents and the line after
    ``<doc>`` repeats the title, which is dropped. Plain text: blank lines delimit documents.
    """
    for file in corpus_files(path):
        doc: list[str] = []
        skip_title = False
        with open(file, encoding="utf-8", errors="replace") as handle:
            for raw in handle:
                line = raw.strip()
                if line.startswith("<doc ") or line.startswith("<doc>"):
                    if doc:
                        yield doc
                    doc, skip_title = [], True
                elif line == "</doc>" or not line:
                    if doc:
                        yield doc
                    doc = []
                elif skip_title:
                    skip_title = False
                else:
                    doc.append(line)
        if doc:
            yield doc


def pack_token_blocks(
    tokenizer,
    documents: Iterable[list[str]],
    max_seq_length: int,
    max_blocks: int | None = None,
    min_tokens: int = 8,
) -> Iterator[dict]:
    """TinyBERT-style blocks ``[CLS] tokens... [SEP]`` of up to ``max_seq_length`` ids.

    Blocks do not cross documents; a document's tail shorter than ``min_tokens`` is dropped.
    """
    if max_seq_length < 8:
        raise CorpusError(f"max_seq_length {max_seq_length} is too small; use at least 8")
    body = max_seq_length - 2
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls_id is None or sep_id is None:
        raise CorpusError("the tokenizer has no [CLS]/[SEP] (or <s>/</s>) tokens")
    made = 0
    for doc in documents:
        # verbose=False: long lines are split into blocks below, so the >max-length warning is noise.
        encoded = tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"]
        buffer: list[int] = []
        for ids in encoded:
            buffer.extend(ids)
            while len(buffer) >= body:
                yield {"input_ids": [cls_id] + buffer[:body] + [sep_id]}
                buffer = buffer[body:]
                made += 1
                if max_blocks is not None and made >= max_blocks:
                    return
        if len(buffer) >= min_tokens:
            yield {"input_ids": [cls_id] + buffer + [sep_id]}
            made += 1
            if max_blocks is not None and made >= max_blocks:
                return
