"""Task registry and loaders on the real data in KD_DATA_DIR, plus small malformed files.

Expected counts are the official ones listed in shared/data/SOURCES.md, and expected rows are
read off the files by eye (``head``), not copied from the loader's output.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kd_core.artifacts import atomic_file
from kd_core.data.loaders import (
    DataFormatError,
    DataSourceError,
    available_splits,
    detect_layout,
    load_split,
    prepare_task,
    read_split,
    write_split,
)
from kd_core.data.schemas import CLASSIFICATION_SCHEMA, REGRESSION_SCHEMA, SQUAD_SCHEMA
from kd_core.data.tasks import TaskSpec, UnknownTaskError, get_task, list_tasks


def counts(df) -> dict:
    return {int(k): int(v) for k, v in df["label"].value_counts().items()}


# ----------------------------------------------------------------------------------------------
# registry


def test_registry_knows_every_task_and_its_shape():
    names = list_tasks()
    for name in ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "mnli-mm", "qnli", "rte", "wnli", "squad", "squad_v2"):
        assert name in names
    for domain in ("books", "dvd", "electronics", "kitchen"):
        assert f"amazon-{domain}" in names
    sst2 = get_task("SST-2")
    assert isinstance(sst2, TaskSpec) and sst2.name == "sst2" and sst2.family == "glue"
    assert sst2.labels == ("negative", "positive") and sst2.text_fields == ("sentence",) and not sst2.is_pair
    assert sst2.folder == "glue/SST-2" and sst2.metrics == ("accuracy",) and sst2.dev_splits == ("dev",)
    stsb = get_task("sts-b")
    assert stsb.is_regression and stsb.labels is None and stsb.metrics == ("pearson", "spearmanr")
    assert get_task("cola").metrics == ("matthews_correlation",)
    assert get_task("mrpc").metrics == ("accuracy", "f1") and get_task("mrpc").is_pair
    mnli = get_task("mnli")
    assert mnli.labels == ("entailment", "neutral", "contradiction")
    assert mnli.dev_splits == ("dev_matched", "dev_mismatched")
    assert mnli.resolve_split("dev") == "dev_matched" and mnli.resolve_split("validation_mismatched") == "dev_mismatched"
    assert get_task("mnli_mismatched").name == "mnli-mm" and get_task("mnli-mm").resolve_split("dev") == "dev_mismatched"
    assert get_task("squad").labels is None and get_task("squad2").name == "squad_v2"
    assert get_task("wnli").labels == ("not_entailment", "entailment")  # the hub's order: 0 = not_entailment
    assert get_task("sst2").resolve_split("validation") == "dev"
    assert get_task("Amazon_Books").folder == "amazon_blitzer/books"


def test_extra_amazon_domains_are_found(kd_data_dir, tmp_path):
    assert "amazon-airline" in list_tasks(kd_data_dir)
    assert get_task("amazon-airline", kd_data_dir).folder == "amazon_blitzer/airline"
    (tmp_path / "amazon_blitzer" / "toys").mkdir(parents=True)
    (tmp_path / "amazon_blitzer" / "toys" / "train.tsv").write_text("sentence\tlabel\nfun\t1\n")
    assert "amazon-toys" in list_tasks(tmp_path)
    df = load_split("amazon-toys", tmp_path, "train")
    assert df["text_a"].tolist() == ["fun"] and df["label"].tolist() == [1]


def test_unknown_tasks_and_splits_fail_clearly():
    with pytest.raises(UnknownTaskError, match=r"unknown task 'sst3'\. Did you mean 'sst2'\?.*Known tasks: cola, sst2"):
        get_task("sst3")
    with pytest.raises(UnknownTaskError, match="Did you mean 'amazon-books'"):
        get_task("amazon-bookz")
    with pytest.raises(UnknownTaskError, match="task sst2 has no split 'dev_matched'; its splits are train, dev, test"):
        get_task("sst2").resolve_split("dev_matched")


# ----------------------------------------------------------------------------------------------
# the real files


@pytest.mark.parametrize(
    "task, split, rows, labels",
    [
        ("sst2", "train", 67349, {1: 37569, 0: 29780}),
        ("sst2", "dev", 872, {1: 444, 0: 428}),
        ("sst2", "test", 1821, {-1: 1821}),
        ("cola", "train", 8551, {1: 6023, 0: 2528}),
        ("cola", "dev", 1043, {1: 721, 0: 322}),
        ("cola", "test", 1063, {-1: 1063}),
        ("mrpc", "train", 3668, {1: 2474, 0: 1194}),
        ("mrpc", "dev", 408, {1: 279, 0: 129}),
        ("mrpc", "test", 1725, {-1: 1725}),
        ("qnli", "dev", 5463, {0: 2702, 1: 2761}),  # 0 = entailment
        ("qnli", "test", 5463, {-1: 5463}),
    ],
)
def test_glue_row_counts_and_labels(kd_data_dir, task, split, rows, labels):
    df = load_split(task, kd_data_dir, split)
    assert len(df) == rows
    assert counts(df) == labels
    assert df.attrs["layout"] == "glue_tsv"
    assert [str(t) for t in df.dtypes] == ["int64", "str", "str", "int64"]
    assert list(df.columns) == ["idx", "text_a", "text_b", "label"]


def test_glue_rows_are_read_as_in_the_files(kd_data_dir):
    sst2 = load_split("sst2", kd_data_dir, "dev")
    assert sst2["text_a"].iloc[0] == "it 's a charming and often affecting journey . "
    assert sst2["label"].iloc[0] == 1 and sst2["label"].iloc[1] == 0
    assert sst2["text_b"].isna().all() and sst2["idx"].tolist() == list(range(872))
    sst2_test = load_split("sst2", kd_data_dir / "glue" / "SST-2", "test")  # the task folder itself works too
    assert sst2_test["text_a"].iloc[0] == "uneasy mishmash of styles and genres ."
    # MRPC: the BOM does not end up in a column name, and quotes stay text (QUOTE_NONE)
    mrpc = load_split("mrpc", kd_data_dir, "dev")
    assert mrpc["text_a"].iloc[0] == "He said the foodservice pie business doesn't fit the company's long-term growth strategy."
    assert mrpc["text_b"].iloc[0] == '"The foodservice pie business does not fit our long-term growth strategy.'
    assert mrpc["label"].iloc[:2].tolist() == [1, 0]
    cola = load_split("cola", kd_data_dir, "dev")  # header-less: the first row is data
    assert cola["text_a"].iloc[0] == "The sailors rode the breeze clear of the rocks." and cola["label"].iloc[0] == 1
    cola_test = load_split("cola", kd_data_dir, "test")
    assert cola_test["text_a"].iloc[0] == "Bill whistled past the house." and cola_test["idx"].iloc[1] == 1
    qnli = load_split("qnli", kd_data_dir, "dev")
    assert qnli["text_a"].iloc[0] == "What came into force after the new constitution was herald?"
    assert qnli["label"].iloc[:2].tolist() == [0, 1]  # entailment, not_entailment


def test_stsb_is_regression(kd_data_dir):
    train, dev, test = (load_split("stsb", kd_data_dir, s) for s in ("train", "dev", "test"))
    assert (len(train), len(dev), len(test)) == (5749, 1500, 1379)
    assert str(dev["label"].dtype) == "float64"
    assert dev["label"].iloc[:2].tolist() == [5.0, 4.75]
    assert (dev["text_a"].iloc[0], dev["text_b"].iloc[0]) == ("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.")
    assert train["label"].between(0, 5).all() and test["label"].isna().all()


@pytest.mark.parametrize("domain", ["books", "dvd", "electronics", "kitchen", "airline"])
def test_amazon_domains(kd_data_dir, domain):
    train, dev, labeled, test = (
        load_split(f"amazon-{domain}", kd_data_dir, s) for s in ("train", "dev", "test-labeled", "test")
    )
    assert (len(train), len(dev), len(labeled), len(test)) == (1700, 300, 2000, 2000)
    assert counts(train) == {0: 850, 1: 850} and counts(dev) == {0: 150, 1: 150}
    assert counts(labeled) == {0: 1000, 1: 1000} and counts(test) == {-1: 2000}
    assert train.attrs["layout"] == "amazon_tsv"
    assert sorted(set(labeled["text_a"])) == sorted(set(train["text_a"]) | set(dev["text_a"]))  # SOURCES.md


def test_amazon_multiline_quoted_fields(kd_data_dir):
    path = kd_data_dir / "amazon_blitzer" / "books" / "train.tsv"
    assert path.read_bytes().count(b"\n") > 1701 * 3  # reviews span several physical lines
    df = load_split("amazon-books", kd_data_dir, "train")
    first = df["text_a"].iloc[0]
    assert first.startswith("Horrible book, horrible.\n\tTHis book was horrible.")
    assert first.endswith("wasted my life") and df["label"].iloc[0] == 0  # line 5 ends `wasted my life"\t0`
    assert '""' not in df["text_a"].iloc[1] and '"shrink" bashers' in df["text_a"].iloc[1]  # CSV quotes undone
    assert df["text_a"].iloc[-1].endswith("We'd highly recommend this book!") and df["label"].iloc[-1] == 1


def test_squad_v11_dev(kd_data_dir):
    df = load_split("squad", kd_data_dir, "dev")
    assert len(df) == 10570
    assert df["title"].nunique() == 48
    assert int((df["context"] != df["context"].shift()).sum()) == 2067  # paragraphs, as runs of questions
    assert list(df.columns) == SQUAD_SCHEMA.names and df.attrs["layout"] == "squad_json"
    first = df.iloc[0]
    assert first["question"] == "Which NFL team represented the AFC at Super Bowl 50?"
    assert first["answers_text"] == ["Denver Broncos"] * 3 and first["answers_start"] == [177] * 3
    assert not df["is_impossible"].any()
    for context, texts, starts in zip(df["context"], df["answers_text"], df["answers_start"]):
        assert texts and all(context[s : s + len(t)] == t for t, s in zip(texts, starts))


def test_squad_v2_json_and_hub_style_squad_export(tmp_path):
    doc = {"version": "v2.0", "data": [{"title": "T", "paragraphs": [{"context": "Some context.", "qas": [
        {"id": "q1", "question": "What?", "answers": [], "plausible_answers": [{"text": "Some", "answer_start": 0}],
         "is_impossible": True},
        {"id": "q2", "question": "Which?", "answers": [{"text": "context", "answer_start": 5}], "is_impossible": False},
    ]}]}]}
    (tmp_path / "squad").mkdir()
    (tmp_path / "squad" / "dev.json").write_text(json.dumps(doc, indent=2))  # pretty-printed, not the official name
    df = load_split("squad_v2", tmp_path, "dev")
    assert df.attrs["layout"] == "squad_json"
    assert df["is_impossible"].tolist() == [True, False] and df["answers_text"].tolist() == [[], ["context"]]
    assert df["answers_start"].tolist() == [[], [5]]
    record = {"id": "a", "title": "t", "context": "ctx x", "question": "q", "answers": {"text": ["x"], "answer_start": [4]}}
    (tmp_path / "validation.jsonl").write_text(json.dumps(record) + "\n")
    df = load_split("squad", tmp_path / "validation.jsonl", "dev")
    assert df.iloc[0].to_dict() == {"id": "a", "title": "t", "context": "ctx x", "question": "q",
                                    "answers_text": ["x"], "answers_start": [4], "is_impossible": False}


def test_missing_tasks_point_at_a_local_folder(kd_data_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataSourceError) as info:
        load_split("mnli", kd_data_dir, "dev")
    message = str(info.value)
    assert str(kd_data_dir / "glue" / "MNLI" / "dev_matched.tsv") in message
    assert "HF_HUB_OFFLINE=1" in message and "--data-dir" in message
    with pytest.raises(DataSourceError, match=r"HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1 forbids the hub.*--data-dir"):
        load_split("sst2", "hub", "dev")
    with pytest.raises(DataSourceError, match="amazon-books has no hub dataset"):
        load_split("amazon-books", "hub", "dev")
    assert available_splits("squad", kd_data_dir) == ["dev"]


def test_hub_rows_are_normalised(monkeypatch):
    """Online, datasets.load_dataset is called with the hub names; here it is faked (no network)."""
    import datasets

    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict(
            {"sentence1": ["A", "B"], "sentence2": ["a", "b"], "label": [1, 0], "idx": [7, 8]}
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    df = load_split("rte", "hub", "dev")
    assert calls == [("nyu-mll/glue", "rte", "validation")]
    assert df["idx"].tolist() == [7, 8] and df["label"].tolist() == [1, 0] and df["text_b"].tolist() == ["a", "b"]
    assert df.attrs["layout"] == "hub"


# ----------------------------------------------------------------------------------------------
# the Hugging Face export layout


def test_hf_export_layout_is_detected(tmp_path):
    folder = tmp_path / "sst2"
    folder.mkdir()
    pd.DataFrame({"sentence": ['a "quoted", comma', "plain"], "label": [1, 0], "idx": [0, 1]}).to_csv(
        folder / "train.csv", index=False
    )
    pd.DataFrame({"sentence": ["dev one"], "label": [0], "idx": [0]}).to_csv(folder / "validation.csv", index=False)
    pd.DataFrame({"sentence": ["t1", "t2"], "label": [-1, -1], "idx": [0, 1]}).to_csv(folder / "test.csv", index=False)
    assert detect_layout("sst2", tmp_path) == "hf_export"
    assert available_splits("sst2", tmp_path) == ["train", "dev", "test"]
    train = load_split("sst2", tmp_path, "train")
    assert train["text_a"].tolist() == ['a "quoted", comma', "plain"] and train["label"].tolist() == [1, 0]
    assert load_split("sst2", tmp_path, "validation")["text_a"].tolist() == ["dev one"]
    assert load_split("sst2", tmp_path, "test")["label"].tolist() == [-1, -1]


def test_hf_export_tsv_with_idx_in_the_glue_place(tmp_path):
    folder = tmp_path / "glue" / "MRPC"
    folder.mkdir(parents=True)
    (folder / "dev.tsv").write_text('sentence1\tsentence2\tlabel\tidx\n"He said ""hi"""\tHe said hi\t1\t5\n')
    assert detect_layout("mrpc", tmp_path, "dev") == "hf_export"
    df = load_split("mrpc", tmp_path, "dev")
    assert df.iloc[0].to_dict() == {"idx": 5, "text_a": 'He said "hi"', "text_b": "He said hi", "label": 1}


def test_hf_export_parquet_shards_and_jsonl(tmp_path):
    folder = tmp_path / "mnli" / "data"
    folder.mkdir(parents=True)
    table = pa.table({"premise": ["p0", "p1", "p2"], "hypothesis": ["h0", "h1", "h2"], "label": [2, 0, 1], "idx": [0, 1, 2]})
    pq.write_table(table.slice(0, 2), folder / "validation_matched-00000-of-00002.parquet")
    pq.write_table(table.slice(2), folder / "validation_matched-00001-of-00002.parquet")
    df = load_split("mnli", tmp_path, "dev")
    assert df.attrs["split"] == "dev_matched" and df.attrs["layout"] == "hf_export"
    assert df["label"].tolist() == [2, 0, 1] and df["text_a"].tolist() == ["p0", "p1", "p2"]
    lines = [{"premise": "x", "hypothesis": "y", "label": 1, "idx": 0}]
    (tmp_path / "mnli" / "validation_mismatched.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    assert load_split("mnli-mm", tmp_path, "dev")["label"].tolist() == [1]


# ----------------------------------------------------------------------------------------------
# bad input: file, line and problem


def _sst2(tmp_path, text: str, name: str = "train.tsv"):
    folder = tmp_path / "glue" / "SST-2"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder / name


def test_bad_input_missing_column(tmp_path):
    path = _sst2(tmp_path, "sentence\tscore\ngood\t1\n")
    with pytest.raises(DataFormatError) as info:
        load_split("sst2", tmp_path, "train")
    assert str(info.value).startswith(f"{path}, line 1: missing column 'label'")
    path = _sst2(tmp_path, "text\tlabel\ngood\t1\n", "dev.tsv")
    with pytest.raises(DataFormatError, match=r"dev\.tsv, line 1: missing column 'sentence' \(the header has: text, label\)"):
        load_split("sst2", tmp_path, "dev")


def test_bad_input_unknown_label(tmp_path):
    path = _sst2(tmp_path, "sentence\tlabel\ngood\t1\nbad\tpositive!\n")
    with pytest.raises(DataFormatError) as info:
        load_split("sst2", tmp_path, "train")
    assert str(info.value) == (
        f"{path}, line 3: unknown label 'positive!' for task sst2; expected one of 0, 1 (negative, positive)"
    )


def test_bad_input_empty_file(tmp_path):
    path = _sst2(tmp_path, "")
    with pytest.raises(DataFormatError, match=rf"^{path}, line 1: empty file"):
        load_split("sst2", tmp_path, "train")
    _sst2(tmp_path, "sentence\tlabel\n", "dev.tsv")
    with pytest.raises(DataFormatError, match=r"dev\.tsv, line 2: empty file: a header but no rows"):
        load_split("sst2", tmp_path, "dev")


def test_bad_input_wrong_number_of_fields(tmp_path):
    path = _sst2(tmp_path, "sentence\tlabel\ngood\t1\nok\t0\nbad\t0\textra\n")
    with pytest.raises(DataFormatError) as info:
        load_split("sst2", tmp_path, "train")
    assert str(info.value) == f"{path}, line 4: expected 2 tab-separated fields as in the header, found 3"
    cola = tmp_path / "glue" / "CoLA"
    cola.mkdir(parents=True)
    (cola / "train.tsv").write_text("gj04\t1\t\tFine.\ngj04\t0\tBroken, no sentence\n")
    with pytest.raises(DataFormatError, match=r"CoLA/train\.tsv, line 2: expected 4 tab-separated fields .* found 3"):
        load_split("cola", tmp_path, "train")


def test_bad_input_in_amazon_names_the_first_line_of_the_record(tmp_path):
    folder = tmp_path / "amazon_blitzer" / "books"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text('sentence\tlabel\r\n"two\nlines"\t1\r\n"three\nmore\nlines"\t5\r\n')
    with pytest.raises(DataFormatError, match=r"books/train\.tsv, line 4: unknown label '5' for task amazon-books"):
        load_split("amazon-books", tmp_path, "train")


def test_bad_input_in_exports_and_regression(tmp_path):
    folder = tmp_path / "stsb"
    folder.mkdir()
    (folder / "train.csv").write_text("sentence1,sentence2,label,idx\na,b,4.5,0\nc,d,high,1\n")
    with pytest.raises(DataFormatError, match=r"train\.csv, line 3: label 'high' is not a number"):
        load_split("stsb", tmp_path, "train")
    (folder / "validation.jsonl").write_text('{"sentence1": "a", "sentence2": "b", "label": 1.0, "idx": 0}\n{"sentence1": "a"\n')
    with pytest.raises(DataFormatError, match=r"validation\.jsonl, line 2: not valid JSON"):
        load_split("stsb", tmp_path, "dev")
    (folder / "test.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(DataFormatError, match=r"test\.parquet: not a readable Parquet file"):
        load_split("stsb", tmp_path, "test")
    pq.write_table(pa.table({"sentence1": ["a"], "label": [0.5], "idx": [0]}), folder / "test.parquet")
    with pytest.raises(DataFormatError, match=r"test\.parquet, schema: missing column 'sentence2'"):
        load_split("stsb", tmp_path, "test")


def test_bad_squad_json_names_line_and_question(tmp_path):
    (tmp_path / "squad").mkdir()
    path = tmp_path / "squad" / "dev-v1.1.json"
    doc = {"data": [{"title": "T", "paragraphs": [{"context": "Some context.", "qas": [
        {"id": "q1", "question": "What?", "answers": [{"text": "Some", "answer_start": 0}]},
        {"id": "q2", "answers": [{"text": "context", "answer_start": 5}]},
    ]}]}]}
    path.write_text(json.dumps(doc, indent=1))
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if '"q2"' in text)
    with pytest.raises(DataFormatError) as info:
        load_split("squad", tmp_path, "dev")
    assert str(info.value).startswith(f"{path}, line {line}, column ")
    assert str(info.value).endswith("(data[0].paragraphs[0].qas[1]): missing column 'question' in this question")
    path.write_text('{"data": [\n{"title": "T",\n "paragraphs": [}\n]}')
    with pytest.raises(DataFormatError, match=r"dev-v1\.1\.json, line 3, column 17: not valid JSON"):
        load_split("squad", tmp_path, "dev")
    path.write_text("")
    with pytest.raises(DataFormatError, match=r"dev-v1\.1\.json, line 1: empty file"):
        load_split("squad", tmp_path, "dev")


# ----------------------------------------------------------------------------------------------
# Parquet round trip and fingerprints


def test_parquet_round_trip_and_stable_fingerprint(kd_data_dir, tmp_path):
    df = load_split("mrpc", kd_data_dir, "dev")
    fp1 = write_split(df, tmp_path / "a" / "dev.parquet", "mrpc", "dev")
    fp2 = write_split(df.copy(), tmp_path / "b" / "dev.parquet", get_task("mrpc"), "dev")
    assert fp1 == fp2 and len(fp1) == 64
    back, meta = read_split(tmp_path / "a" / "dev.parquet", verify=True)
    pd.testing.assert_frame_equal(back, df.reset_index(drop=True), check_like=False)
    assert meta["task"] == "mrpc" and meta["split"] == "dev" and meta["fingerprint"] == fp1
    assert meta["labels"] == ["not_equivalent", "equivalent"] and meta["num_rows"] == 408
    assert pq.read_schema(tmp_path / "a" / "dev.parquet").remove_metadata() == CLASSIFICATION_SCHEMA
    # a fresh interpreter computes the same digest (no per-process hashing involved)
    code = (
        "from kd_core.data.loaders import load_split, dataframe_to_table;"
        "from kd_core.data.schemas import fingerprint_table;"
        f"print(fingerprint_table(dataframe_to_table(load_split('mrpc', {str(kd_data_dir)!r}, 'dev'), 'mrpc')))"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == fp1
    changed = df.copy()
    changed.loc[0, "label"] = 1 - changed.loc[0, "label"]
    assert write_split(changed, tmp_path / "c.parquet", "mrpc", "dev") != fp1
    # the written file is itself a source: layout "parquet"
    again = load_split("mrpc", tmp_path / "a", "dev")
    assert again.attrs["layout"] == "parquet" and len(again) == 408


def test_round_trip_regression_and_squad(kd_data_dir, tmp_path):
    stsb = load_split("stsb", kd_data_dir, "test")
    write_split(stsb, tmp_path / "stsb.parquet", "stsb", "test")
    back, meta = read_split(tmp_path / "stsb.parquet")
    assert back["label"].isna().all() and meta["labels"] is None and meta["schema"] == "regression"
    assert pq.read_schema(tmp_path / "stsb.parquet").remove_metadata() == REGRESSION_SCHEMA
    squad = load_split("squad", kd_data_dir, "dev").head(50)
    fp = write_split(squad, tmp_path / "squad.parquet", "squad", "dev")
    back, meta = read_split(tmp_path / "squad.parquet", verify=True)
    assert meta["fingerprint"] == fp and back["answers_text"].iloc[0] == ["Denver Broncos"] * 3
    written = pq.read_schema(tmp_path / "squad.parquet")
    assert written.names == SQUAD_SCHEMA.names and written.field("answers_start").type.value_type == pa.int64()


def test_write_split_validates_and_is_atomic(tmp_path, monkeypatch):
    df = pd.DataFrame({"idx": [0, 1], "text_a": ["a", "b"], "text_b": [None, None], "label": [0, 2]})
    with pytest.raises(DataFormatError, match="label values 0..2 outside -1..1 of task sst2"):
        write_split(df, tmp_path / "x.parquet", "sst2", "train")
    with pytest.raises(DataFormatError, match="missing column 'label'"):
        write_split(df.drop(columns="label"), tmp_path / "x.parquet", "sst2", "train")
    good = df.assign(label=[0, 1])
    write_split(good, tmp_path / "x.parquet", "sst2", "train")
    before = (tmp_path / "x.parquet").read_bytes()

    def broken(table, where, **kwargs):
        with open(where, "wb") as handle:
            handle.write(b"PAR1 half")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        write_split(good.assign(label=[1, 1]), tmp_path / "x.parquet", "sst2", "train")
    assert (tmp_path / "x.parquet").read_bytes() == before  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.parquet"]  # no temp file left


def test_atomic_file(tmp_path):
    with atomic_file(tmp_path / "sub" / "f.txt") as tmp:
        tmp.write_text("done")
        assert not (tmp_path / "sub" / "f.txt").exists()
    assert (tmp_path / "sub" / "f.txt").read_text() == "done"


def test_prepare_task_writes_every_split_and_a_manifest(kd_data_dir, tmp_path):
    results = prepare_task("cola", kd_data_dir, tmp_path / "cola")
    assert list(results) == ["train", "dev", "test"]
    manifest = json.loads((tmp_path / "cola" / "manifest.json").read_text())
    assert {s: e["rows"] for s, e in manifest["splits"].items()} == {"train": 8551, "dev": 1043, "test": 1063}
    for split, (path, fingerprint) in results.items():
        assert path == tmp_path / "cola" / f"{split}.parquet"
        assert read_split(path)[1]["fingerprint"] == fingerprint == manifest["splits"][split]["fingerprint"]
    only = prepare_task("cola", kd_data_dir, tmp_path / "cola", splits=["validation"])
    assert list(only) == ["dev"] and only["dev"][1] == results["dev"][1]
    with pytest.raises(DataSourceError, match="no split of task qqp"):
        prepare_task("qqp", kd_data_dir, tmp_path / "qqp")

