"""The task registry: every GLUE task, SQuAD v1.1/v2.0 and the Amazon multi-domain reviews.

A :class:`TaskSpec` says what a task is (text fields, labels or regression, metrics, splits,
dev splits) and where its files sit under a data folder. Loading lives in
:mod:`kd_core.data.loaders`.

Names are matched loosely: case, ``-``, ``_``, ``.`` and spaces are ignored, so ``SST-2``,
``sst_2`` and ``sst2`` are the same task. Amazon domains are ``amazon-<domain>``; besides the
four Blitzer domains, any folder under ``<data_dir>/amazon_blitzer/`` is a domain too.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from kd_core.errors import UserError


class UnknownTaskError(UserError, LookupError):
    pass


@dataclass(frozen=True)
class TaskSpec:
    name: str
    family: str  # "glue" | "squad" | "amazon"
    text_fields: tuple[str, ...]  # the Hugging Face column names of the texts, in order
    labels: tuple[str, ...] | None  # None: regression or extractive QA
    is_regression: bool
    metrics: tuple[str, ...]
    # canonical split name -> its file in the original layout (a stem of ``<stem>.tsv``, or a file name)
    splits: dict = field(hash=False)
    dev_splits: tuple[str, ...]
    folder: str  # default folder under the data dir
    # label spellings in the original files, aligned with ``labels`` (GLUE writes "0"/"1" for some tasks)
    raw_labels: tuple[str, ...] | None = None
    hf_path: str | None = None  # hub dataset for datasets.load_dataset, when there is one
    hf_config: str | None = None
    hf_splits: dict = field(default_factory=dict, hash=False)  # canonical split -> hub split
    description: str = ""

    @property
    def num_labels(self) -> int:
        """Number of classes; 1 for regression, 0 for extractive QA."""
        if self.labels is not None:
            return len(self.labels)
        return 1 if self.is_regression else 0

    @property
    def is_pair(self) -> bool:
        return self.family != "squad" and len(self.text_fields) == 2

    @property
    def is_qa(self) -> bool:
        return self.family == "squad"

    @property
    def train_split(self) -> str:
        return "train"

    def hub_split(self, split: str) -> str:
        split = self.resolve_split(split)
        return self.hf_splits.get(split, split)

    def resolve_split(self, split: str) -> str:
        """Canonical split name for ``split``: ``validation`` means ``dev``, ``dev`` the first dev split."""
        if split in self.splits:
            return split
        key = _norm(split).replace("validation", "dev")
        by_key = {_norm(s).replace("validation", "dev"): s for s in self.splits}
        if key in by_key:
            return by_key[key]
        for canonical, hub in self.hf_splits.items():
            if _norm(hub) == _norm(split):
                return canonical
        if key == "dev" and self.dev_splits:
            return self.dev_splits[0]
        if key == "test":
            tests = [s for s in self.splits if s.startswith("test") and "labeled" not in s]
            if tests:
                return tests[0]
        raise UnknownTaskError(
            f"task {self.name} has no split {split!r}; its splits are {', '.join(self.splits)}"
        )


def _norm(name: str) -> str:
    return re.sub(r"[\s\-_.]", "", name.strip().lower())


_GLUE_SPLITS = {"train": "train", "dev": "dev", "test": "test"}
_GLUE_HF = {"dev": "validation"}


def _glue(name, folder, text_fields, labels, metrics, raw=None, regression=False, hf_config=None, description=""):
    return TaskSpec(
        name=name,
        family="glue",
        text_fields=text_fields,
        labels=labels,
        is_regression=regression,
        metrics=metrics,
        splits=dict(_GLUE_SPLITS),
        dev_splits=("dev",),
        folder=f"glue/{folder}",
        raw_labels=raw if raw is not None else labels,
        hf_path="nyu-mll/glue",
        hf_config=hf_config or name,
        hf_splits=dict(_GLUE_HF),
        description=description,
    )


_BINARY = ("0", "1")
_MNLI_LABELS = ("entailment", "neutral", "contradiction")

_TASKS: list[TaskSpec] = [
    _glue("cola", "CoLA", ("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation",), _BINARY,
          description="grammatical acceptability"),
    _glue("sst2", "SST-2", ("sentence",), ("negative", "positive"), ("accuracy",), _BINARY,
          description="movie review sentiment"),
    _glue("mrpc", "MRPC", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("accuracy", "f1"), _BINARY,
          description="paraphrase"),
    _glue("stsb", "STS-B", ("sentence1", "sentence2"), None, ("pearson", "spearmanr"), regression=True,
          description="semantic similarity, 0-5"),
    _glue("qqp", "QQP", ("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1"), _BINARY,
          description="duplicate questions"),
    TaskSpec(
        name="mnli",
        family="glue",
        text_fields=("premise", "hypothesis"),
        labels=_MNLI_LABELS,
        is_regression=False,
        metrics=("accuracy",),
        splits={
            "train": "train",
            "dev_matched": "dev_matched",
            "dev_mismatched": "dev_mismatched",
            "test_matched": "test_matched",
            "test_mismatched": "test_mismatched",
        },
        dev_splits=("dev_matched", "dev_mismatched"),
        folder="glue/MNLI",
        raw_labels=_MNLI_LABELS,
        hf_path="nyu-mll/glue",
        hf_config="mnli",
        hf_splits={"dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched"},
        description="natural language inference (dev: matched and mismatched)",
    ),
    TaskSpec(
        name="mnli-mm",
        family="glue",
        text_fields=("premise", "hypothesis"),
        labels=_MNLI_LABELS,
        is_regression=False,
        metrics=("accuracy",),
        splits={"train": "train", "dev_mismatched": "dev_mismatched", "test_mismatched": "test_mismatched"},
        dev_splits=("dev_mismatched",),
        folder="glue/MNLI",
        raw_labels=_MNLI_LABELS,
        hf_path="nyu-mll/glue",
        hf_config="mnli",
        hf_splits={"dev_mismatched": "validation_mismatched"},
        description="MNLI evaluated on the mismatched genres",
    ),
    _glue("qnli", "QNLI", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",),
          description="question-answer entailment"),
    _glue("rte", "RTE", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",),
          description="textual entailment"),
    _glue("wnli", "WNLI", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",), _BINARY,
          description="Winograd NLI"),
    TaskSpec(
        name="squad",
        family="squad",
        text_fields=("question", "context"),
        labels=None,
        is_regression=False,
        metrics=("exact_match", "f1"),
        splits={"train": "train-v1.1.json", "dev": "dev-v1.1.json"},
        dev_splits=("dev",),
        folder="squad",
        hf_path="rajpurkar/squad",
        hf_splits={"dev": "validation"},
        description="SQuAD v1.1 extractive QA",
    ),
    TaskSpec(
        name="squad_v2",
        family="squad",
        text_fields=("question", "context"),
        labels=None,
        is_regression=False,
        metrics=("exact_match", "f1"),
        splits={"train": "train-v2.0.json", "dev": "dev-v2.0.json"},
        dev_splits=("dev",),
        folder="squad",
        hf_path="rajpurkar/squad_v2",
        hf_splits={"dev": "validation"},
        description="SQuAD v2.0 extractive QA with unanswerable questions",
    ),
]

AMAZON_DOMAINS = ("books", "dvd", "electronics", "kitchen")
AMAZON_FOLDER = "amazon_blitzer"


def amazon_task(domain: str) -> TaskSpec:
    """The spec of one Amazon review domain (``amazon_blitzer/<domain>/``).

    Files per domain: train.tsv (1,700) and dev.tsv (300) with ``sentence, label``; test.tsv
    (``index, sentence``, no labels) and test-labeled.tsv: the same 2,000 reviews as train ∪ dev.
    """
    return TaskSpec(
        name=f"amazon-{domain}",
        family="amazon",
        text_fields=("sentence",),
        labels=("negative", "positive"),
        is_regression=False,
        metrics=("accuracy",),
        splits={"train": "train", "dev": "dev", "test": "test", "test-labeled": "test-labeled"},
        dev_splits=("dev",),
        folder=f"{AMAZON_FOLDER}/{domain}",
        raw_labels=_BINARY,
        description=f"Amazon reviews, {domain} domain (Blitzer et al. 2007)",
    )


for _domain in AMAZON_DOMAINS:
    _TASKS.append(amazon_task(_domain))

TASKS: dict[str, TaskSpec] = {t.name: t for t in _TASKS}

_ALIASES = {
    "sst": "sst2",
    "stsbenchmark": "stsb",
    "mnlim": "mnli",
    "mnlimatched": "mnli",
    "mnlimismatched": "mnli-mm",
    "squad1": "squad",
    "squadv1": "squad",
    "squadv11": "squad",
    "squad11": "squad",
    "squad2": "squad_v2",
    "squadv20": "squad_v2",
    "squad20": "squad_v2",
}


def default_data_dir() -> Path:
    """``$KD_DATA_DIR``, else ``../shared/data`` (from the working directory, then from the repo)."""
    env = os.environ.get("KD_DATA_DIR")
    if env:
        return Path(env)
    here = Path("../shared/data")
    if here.is_dir():
        return here
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def amazon_domains(data_dir: str | Path | None = None) -> list[str]:
    """The four Blitzer domains plus every further domain folder under ``<data_dir>/amazon_blitzer``."""
    domains = list(AMAZON_DOMAINS)
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    for base in (root / AMAZON_FOLDER, root):
        if base.name != AMAZON_FOLDER or not base.is_dir():
            continue
        for sub in sorted(base.iterdir()):
            if sub.is_dir() and any(sub.glob("*.tsv")) and sub.name not in domains:
                domains.append(sub.name)
    return domains


def list_tasks(data_dir: str | Path | None = None) -> list[str]:
    """Every known task name; extra Amazon domains are found under ``data_dir`` (default: the data dir)."""
    names = list(TASKS)
    names += [f"amazon-{d}" for d in amazon_domains(data_dir) if f"amazon-{d}" not in TASKS]
    return names


def get_task(name: str | TaskSpec, data_dir: str | Path | None = None) -> TaskSpec:
    """The TaskSpec for a task name (loosely matched); unknown names fail with the known list."""
    if isinstance(name, TaskSpec):
        return name
    if not isinstance(name, str) or not name.strip():
        raise UnknownTaskError(f"a task name is required; known tasks: {', '.join(list_tasks(data_dir))}")
    key = _norm(name)
    key = _ALIASES.get(key, key)
    by_key = {_norm(n): n for n in TASKS}
    if key in by_key:
        return TASKS[by_key[key]]
    if key in _ALIASES.values():
        return TASKS[key]
    if key.startswith("amazon"):
        domain = re.sub(r"^amazon", "", key)
        for found in amazon_domains(data_dir):
            if _norm(found) == domain:
                return amazon_task(found)
    known = list_tasks(data_dir)
    close = difflib.get_close_matches(name.strip().lower(), known, n=1, cutoff=0.6)
    if not close:
        close = [by_key[k] for k in difflib.get_close_matches(key, list(by_key), n=1, cutoff=0.6)]
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownTaskError(f"unknown task {name!r}.{hint} Known tasks: {', '.join(known)}")
