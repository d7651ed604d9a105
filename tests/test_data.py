"""prepare_data.py: sources, tokenizer, shards, the batch loader and the errors a user can cause. CPU, offline."""

import bz2
import gzip
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import corpora
import prepare_data
from conftest import ROOT
from cli import UserError, run_main

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Héllo wörld, ünïcödé, emoji 🎉 and 日本語.\nA second line of the same document.",
    'def add(a, b):\n    return a + b  # "code", with quotes, commas; and tabs\tinside',
    "To be, or not to be, that is the question.",
] * 5


@pytest.fixture(autouse=True, scope="module")
def datasets_cache(tmp_path_factory):
    """Keep `datasets`' Arrow copies of the test files out of the user's ~/.cache."""
    import datasets

    old = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = tmp_path_factory.mktemp("hf_datasets_cache")
    yield
    datasets.config.HF_DATASETS_CACHE = old


def expected_tokens(tokenizer, docs):
    ids = [i for d in docs for i in tokenizer.encode(d, add_special_tokens=False) + [tokenizer.eos_token_id]]
    return np.array(ids), sum(len(d.encode("utf-8")) for d in docs)


def write_formats(folder, docs):
    """The same documents in every local format prepare_data reads."""
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet
    import zstandard

    folder.mkdir()
    paths = {}
    text = "\n\n".join(docs) + "\n"
    jsonl = "".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs))
    table = pa.table({"id": list(range(len(docs))), "text": docs})
    paths["txt"] = folder / "a.txt"
    paths["txt"].write_text(text, encoding="utf-8")
    paths["md"] = folder / "a.md"
    paths["md"].write_text(text.replace("\n\n", "\n \n\n"), encoding="utf-8")  # blank lines with spaces too
    paths["txt.gz"] = folder / "b.txt.gz"
    paths["txt.gz"].write_bytes(gzip.compress(text.encode()))
    paths["jsonl"] = folder / "a.jsonl"
    paths["jsonl"].write_text(jsonl, encoding="utf-8")
    paths["jsonl.zst"] = folder / "b.jsonl.zst"
    paths["jsonl.zst"].write_bytes(zstandard.ZstdCompressor().compress(jsonl.encode()))
    paths["json.bz2"] = folder / "c.json.bz2"
    paths["json.bz2"].write_bytes(bz2.compress(json.dumps([{"text": d} for d in docs]).encode()))
    paths["parquet"] = folder / "a.parquet"
    pyarrow.parquet.write_table(table, paths["parquet"])
    paths["csv"] = folder / "a.csv"
    pyarrow.csv.write_csv(table, paths["csv"])
    paths["folder of .txt"] = folder / "docs"
    paths["folder of .txt"].mkdir()
    for i, d in enumerate(docs):  # one document per file; sorted names keep the order
        (paths["folder of .txt"] / f"{i:03d}.txt").write_text(d, encoding="utf-8")
    (paths["folder of .txt"] / ".hidden.txt").write_text("not read", encoding="utf-8")
    return paths


def test_every_local_format_gives_the_same_tokens(tmp_path, tiny_tokenizer):
    want_ids, want_bytes = expected_tokens(tiny_tokenizer, DOCS)
    for kind, path in write_formats(tmp_path / "formats", DOCS).items():
        ids, n_bytes = prepare_data.tokenize_source(str(path), tiny_tokenizer)
        assert ids.dtype == np.uint16, kind
        np.testing.assert_array_equal(ids, want_ids, err_msg=kind)
        assert n_bytes == want_bytes, kind
    two_procs, _ = prepare_data.tokenize_source(str(tmp_path / "formats" / "a.jsonl"), tiny_tokenizer, num_proc=2)
    np.testing.assert_array_equal(two_procs, want_ids)  # Dataset.map in 2 processes keeps the order


def test_max_tokens_keeps_whole_documents_until_the_budget(tmp_path, tiny_tokenizer):
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    lengths = [len(tiny_tokenizer.encode(d, add_special_tokens=False)) + 1 for d in DOCS]
    budget = sum(lengths[:3]) - 1  # reached inside the third document
    ids, n_bytes = prepare_data.tokenize_source(str(path), tiny_tokenizer, max_tokens=budget)
    np.testing.assert_array_equal(ids, expected_tokens(tiny_tokenizer, DOCS[:3])[0])
    assert n_bytes == sum(len(d.encode()) for d in DOCS[:3])


def test_hub_stream_path_with_a_local_stream(tmp_path):
    """The hub code path (streamed rows, byte budget, text field check, on-disk Dataset), fed by a local stream."""
    from datasets import load_dataset

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCS))
    stream = load_dataset("json", data_files=str(path), split="train", streaming=True)
    ds = corpora.materialize(stream, "body", max_bytes=60, where="rows")
    assert ds["text"][:] == DOCS[:2]  # the budget is passed inside the second document, which is kept whole
    assert len(corpora.materialize(stream, "body", None, "rows")) == len(DOCS)
    with pytest.raises(UserError, match="no 'text' field"):
        corpora.materialize(stream, "text", None, "rows")


@pytest.mark.slow  # ~25 s on a busy 2-core machine
def test_builtin_corpus_prepares_offline_and_is_reused(tmp_path):
    docs = corpora.builtin_documents()
    assert len(docs) > 300 and 1e6 < sum(map(len, docs)) < 2e7
    data_dir = prepare_data.prepare("builtin", tmp_path, vocab_size=512, val_fraction=0.01)
    meta = prepare_data.load_meta(data_dir)
    assert meta["documents"] == len(docs) and meta["val_documents"] == round(len(docs) * 0.01)
    assert meta["train_bytes"] + meta["val_bytes"] == sum(len(d.encode()) for d in docs)
    assert meta["vocab_size"] == 512 and meta["dtype"] == "uint16" and meta["eos_id"] is not None
    for split in ("train", "val"):
        assert (data_dir / f"{split}.bin").stat().st_size == 2 * meta[f"{split}_tokens"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(data_dir))
    train = np.memmap(data_dir / "train.bin", dtype=np.uint16, mode="r")
    assert (train == meta["eos_id"]).sum() == meta["train_documents"]
    first = train[: int(np.argmax(train == meta["eos_id"]))]
    assert tok.decode(first) in docs  # documents are stored whole and in order
    mtime = (data_dir / "meta.json").stat().st_mtime_ns
    assert prepare_data.prepare("builtin", tmp_path, vocab_size=512) == data_dir
    assert (data_dir / "meta.json").stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [data_dir.name]  # no temporary folder left


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_trained_tokenizer_round_trips_any_unicode(text, saved_tokenizer):
    tok, reloaded = saved_tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert reloaded.encode(text, add_special_tokens=False) == ids


@pytest.fixture(scope="module")
def saved_tokenizer(tmp_path_factory, tiny_tokenizer):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tok")
    tiny_tokenizer.save_pretrained(str(path))
    reloaded = AutoTokenizer.from_pretrained(str(path))
    assert reloaded.eos_token == prepare_data.EOS and reloaded.chat_template == prepare_data.CHAT_TEMPLATE
    return tiny_tokenizer, reloaded


def test_token_dtype_widens_for_large_vocabularies():
    assert prepare_data.token_dtype(65536) == np.uint16
    assert prepare_data.token_dtype(65537) == np.uint32


def test_vocabularies_over_65536_get_uint32_shards(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(70_000)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<eos>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    (tmp_path / "big.txt").write_text("\n\n".join(f"w{69_990 + i % 10} w{i}" for i in range(40)))
    data_dir = prepare_data.prepare(str(tmp_path / "big.txt"), tmp_path / "data", tokenizer=tokenizer,
                                    val_fraction=0.1)
    meta = prepare_data.load_meta(data_dir)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_001
    assert meta["train_tokens"] + meta["val_tokens"] == 40 * 3
    x, y = prepare_data.BatchLoader(data_dir, "train", 8, 5, seed=0).get_batch(0)
    assert x.max() >= 69_990 and y.max() >= 69_990  # ids above 65,535 survive the round trip


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, tiny_tokenizer):
    """A prepared folder from a .txt of ~100 paragraphs, with the tiny tokenizer."""
    folder = tmp_path_factory.mktemp("small")
    (folder / "book.txt").write_text("\n\n".join(f"{i}: {DOCS[i % len(DOCS)]}" for i in range(100)))
    return prepare_data.prepare(str(folder / "book.txt"), folder / "data", tokenizer=tiny_tokenizer,
                                val_fraction=0.1, seed=3)


def test_split_is_by_document_and_fixed_by_the_seed(small_data):
    meta = prepare_data.load_meta(small_data)
    assert (meta["train_documents"], meta["val_documents"]) == (90, 10)
    val = np.fromfile(small_data / "val.bin", dtype=np.uint16)
    assert val[-1] == meta["eos_id"] and (val == meta["eos_id"]).sum() == 10  # whole documents only
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(meta["tokenizer_dir"])
    held_out = [int(d.split(":")[0]) for d in tok.decode(val).split(prepare_data.EOS) if d]
    assert held_out == sorted(held_out) and len(held_out) == 10
    is_val = prepare_data.pick_validation(100, 0.1, seed=3)
    assert sorted(np.flatnonzero(is_val)) == held_out  # the seed alone decides, on every run


LOADER_SNIPPET = """
import sys, torch
sys.path.insert(0, {root!r})
from prepare_data import BatchLoader
x, y = BatchLoader({data!r}, "train", 4, 16, seed=7, rank=1, world_size=2).get_batch(5, micro_step=2)
torch.save((x, y), {out!r})
"""


def test_loader_batches_are_a_function_of_seed_step_and_rank(small_data, tmp_path):
    def batch(**kw):
        args = {"seed": 7, "rank": 1, "world_size": 2} | {k: kw.pop(k) for k in list(kw) if k in ("seed", "rank")}
        return prepare_data.BatchLoader(small_data, "train", 4, 16, **args).get_batch(**kw)

    x, y = batch(step=5, micro_step=2)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one token
    data = torch.from_numpy(np.fromfile(small_data / "train.bin", dtype=np.uint16).astype(np.int64))
    for row_x, row_y in zip(x, y):  # every row is a real window of the token file
        windows = data.unfold(0, 17, 1)
        assert (windows == torch.cat([row_x, row_y[-1:]])).all(dim=1).any()
    out = tmp_path / "batch.pt"
    code = LOADER_SNIPPET.format(root=str(ROOT), data=str(small_data), out=str(out))
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    x2, y2 = torch.load(out)
    assert torch.equal(x, x2) and torch.equal(y, y2)  # same batch in another process
    assert not torch.equal(x, batch(step=5, micro_step=2, rank=0)[0])
    assert not torch.equal(x, batch(step=6, micro_step=2)[0])
    assert not torch.equal(x, batch(step=5, micro_step=1)[0])
    assert not torch.equal(x, batch(step=5, micro_step=2, seed=8)[0])
    val = prepare_data.BatchLoader(small_data, "val", 4, 16, seed=7).get_batch(5, micro_step=2)[0]
    assert val.max() < len(prepare_data.load_tokenizer(small_data))


def test_loader_rejects_a_split_shorter_than_a_window(small_data):
    n = prepare_data.load_meta(small_data)["val_tokens"]
    prepare_data.BatchLoader(small_data, "val", 2, n - 1)  # exactly one window fits
    with pytest.raises(UserError, match="fewer than seq_len"):
        prepare_data.BatchLoader(small_data, "val", 2, n)
    with pytest.raises(UserError, match="not a prepared data folder"):
        prepare_data.BatchLoader(small_data.parent, "train", 2, 8)
    with pytest.raises(UserError, match="outside world_size"):
        prepare_data.BatchLoader(small_data, "train", 2, 8, rank=2, world_size=2)


def test_loader_refuses_a_damaged_folder(tmp_path, small_data):
    import shutil

    damaged = shutil.copytree(small_data, tmp_path / "damaged")
    with open(damaged / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(UserError, match="prepare again"):
        prepare_data.BatchLoader(damaged, "train", 2, 8)


def bad_inputs(tmp_path):
    """(flags, expected message) for each mistake; the files are made here."""
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": "  "}) + "\n")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "rows.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    (tmp_path / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "café"}\n'.encode("latin-1"))
    (tmp_path / "notes.docx").write_bytes(b"PK")
    (tmp_path / "one.txt").write_text("a single paragraph")
    t = str(tmp_path)
    return [
        ([f"--dataset={t}/missing.txt"], "no such file or folder"),
        ([f"--dataset={t}/missing_dir/"], "no such file or folder"),
        ([f"--dataset={t}/empty.txt"], "no text"),
        ([f"--dataset={t}/blank.jsonl"], "no text"),
        ([f"--dataset={t}/empty_dir"], "folder has no"),
        ([f"--dataset={t}/rows.jsonl"], "no 'text' field .*--text_field"),
        ([f"--dataset={t}/latin1.txt"], "not UTF-8"),
        ([f"--dataset={t}/latin1.jsonl"], "not UTF-8"),
        ([f"--dataset={t}/notes.docx"], "unsupported file type"),
        ([f"--dataset={t}/one.txt"], "single document"),
        ([f"--dataset={t}/one.txt", "--vocab_size=100"], "vocab_size 100 is too small"),
        (["--dataset=nobody/no-such-dataset"], "hub cannot be reached"),
        ([f"--dataset={t}/one.txt", "--tokenizer=" + t + "/no_tokenizer"], "no such folder"),
        (["--val_fraction=1.5", f"--dataset={t}/rows.jsonl", "--text_field=body"], "val_fraction"),
    ]


def test_bad_inputs_are_one_line_user_errors(tmp_path):
    for flags, message in bad_inputs(tmp_path):
        with pytest.raises(UserError, match=message) as err:
            prepare_data.main([f"--out_dir={tmp_path}/out", "--vocab_size=300"] + flags)  # later flags win
        assert "\n" not in str(err.value), flags
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing half-written


def test_command_line_summary_reuse_and_error(tmp_path, capsys):
    book = tmp_path / "book.txt"
    book.write_text("\n\n".join(DOCS * 3))
    flags = [f"--dataset={book}", f"--out_dir={tmp_path}/data", "--vocab_size=300", "--val_fraction=0.1"]
    first = subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), *flags], capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr
    assert "wrote" in first.stdout and "bytes/token" in first.stdout and "documents" in first.stdout
    assert "tokenizing" in first.stderr  # the progress bar
    prepare_data.main(flags)  # in-process: the second run finds the folder
    assert "reused" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_code:
        run_main(prepare_data.main, [f"--dataset={tmp_path}/nope.txt"])
    err = capsys.readouterr().err
    assert exit_code.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("error: ") and "see README: Data sources" in err
