"""
Where text comes from: every source becomes a `datasets.Dataset` with one "text" column, one row per document.

- "builtin": the Python standard library's documentation (pydoc topics and module docstrings), ~2 MB of English
  that every Python installation has, so the default run needs no download;
- a local file or folder: .txt/.md (a blank line ends a document), .jsonl/.json/.parquet/.csv (one document per
  record, its TEXT_FIELD), each also compressed (.gz .zst .bz2 .xz);
- a Hugging Face hub dataset, streamed, and with a token budget only as much of it as the budget needs.
"""

from __future__ import annotations

import ast
import functools
import platform
import re
import sysconfig
from pathlib import Path
from typing import Iterator

from cli import UserError

HUB_BYTES_PER_TOKEN = 10  # with a token budget, stream this many bytes of text per token (well above real ~4)
SUFFIX_BUILDERS = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet",
                   ".csv": "csv"}  # file suffix -> the `datasets` builder that reads it
COMPRESSIONS = (".gz", ".zst", ".zstd", ".bz2", ".xz")  # `datasets` decompresses these by itself
SKIP_STDLIB_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}  # test data is not prose
PARAGRAPH_BREAK = re.compile(r"\n\s*\n")  # a blank line ends a document in .txt/.md files


@functools.lru_cache(maxsize=1)
def builtin_documents() -> tuple[str, ...]:
    """An English corpus every Python install carries: the reference topics of pydoc_data (one document each),
    then the docstrings of each standard-library module (one document per module), in sorted path order.
    Modules are parsed with `ast`, never imported: importing all of them would run their code."""
    from pydoc_data.topics import topics

    docs = [topics[k].strip() for k in sorted(topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        if SKIP_STDLIB_DIRS & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):  # a few files are deliberately broken or in old syntax
            continue
        text = "\n\n".join(module_docstrings(tree))
        if text:
            docs.append(text)
    return tuple(docs)


def module_docstrings(node: ast.AST) -> Iterator[str]:
    """Docstrings of a module, its classes and functions, depth first (statements are not walked into)."""
    doc = ast.get_docstring(node)
    if doc and doc.strip():
        yield doc.strip()
    for child in node.body:
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from module_docstrings(child)


def builder_for(path: Path) -> str | None:
    name = path.name.lower()
    for c in COMPRESSIONS:
        name = name.removesuffix(c)
    return SUFFIX_BUILDERS.get(Path(name).suffix)


def local_files(path: Path) -> list[Path]:
    """The readable files a path names: itself, or every supported file under a folder (hidden ones skipped)."""
    kinds = ", ".join(SUFFIX_BUILDERS)
    if path.is_file():
        if builder_for(path) is None:
            raise UserError(f"{path}: unsupported file type; use one of {kinds} (optionally .gz/.zst)",
                            "Data sources")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and builder_for(p)
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise UserError(f"{path}: folder has no {kinds} files", "Data sources")
    return files


def clean_documents(batch: dict, text_field: str, paragraphs: bool) -> dict:
    """One document per row in a "text" column: plain text is split at blank lines (so a single book still has
    documents to hold out for validation; `datasets` splits only at "\\n\\n", not at lines of spaces); empty
    and missing texts are dropped."""
    docs = []
    for text in batch[text_field]:
        if not text:
            continue
        parts = PARAGRAPH_BREAK.split(text) if paragraphs else [text]
        docs.extend(p.rstrip().lstrip("\r\n") for p in parts if p.strip())
    return {"text": docs}


def load_files(builder: str, files: list[Path], text_field: str, where: Path):
    """Read files of one kind with `datasets`, into a clean "text" dataset; every way it can fail is a UserError."""
    from datasets import Value, load_dataset
    from datasets.exceptions import DatasetGenerationError

    field = "text" if builder == "text" else text_field
    try:
        ds = load_dataset(builder, data_files=[str(f) for f in files], split="train",
                          **({"sample_by": "paragraph"} if builder == "text" else {}))  # read in 10 MB chunks
        if field not in ds.column_names:
            raise UserError(f"{where}: no {field!r} field (columns: {', '.join(ds.column_names)}); "
                            f"name the text column with --text_field=NAME", "Data sources")
        if ds.features[field] not in (Value("string"), Value("large_string")):
            raise UserError(f"{where}: field {field!r} holds {ds.features[field]}, not text", "Data sources")
        return ds.map(clean_documents, batched=True, remove_columns=ds.column_names, desc="reading",
                      fn_kwargs={"text_field": field, "paragraphs": builder == "text"})
    except (DatasetGenerationError, UnicodeDecodeError, StopIteration) as e:
        raise read_error(e, where) from None


def read_error(e: Exception, where) -> UserError:
    """The user's problem behind an error from deep inside `datasets` (it wraps what a generator raised)."""
    cause = e if isinstance(e, UnicodeDecodeError) else e.__cause__ or e.__context__
    if isinstance(cause, UserError):
        return cause
    if isinstance(cause, UnicodeDecodeError):
        return UserError(f"{where}: not UTF-8 text ({cause.reason} at byte {cause.start}); convert it first, "
                         f"e.g. iconv -f latin1 -t utf-8 in.txt > out.txt", "Data sources")
    if isinstance(e, StopIteration) or "SchemaInferenceError" in type(cause).__name__:
        return UserError(f"{where}: no text in it (empty file?)", "Data sources")
    return UserError(f"{where}: cannot read it: {cause or e}", "Data sources")


def load_local(path: Path, text_field: str):
    from datasets import concatenate_datasets

    files = local_files(path)
    builders = sorted({builder_for(f) for f in files})
    parts = [load_files(b, [f for f in files if builder_for(f) == b], text_field, path) for b in builders]
    return concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def stream_documents(stream, text_field: str, max_bytes: int | None) -> Iterator[dict]:
    """Rows of a streamed dataset as {"text": ...} documents, stopping once max_bytes of text have come."""
    total = 0
    for row in stream:
        if text_field not in row:
            raise UserError(f"the dataset has no {text_field!r} field (fields: {', '.join(row)}); name the text "
                            f"column with --text_field=NAME", "Data sources")
        text = row[text_field]
        if text and text.strip():
            yield {"text": text}
            total += len(text.encode("utf-8"))
            if max_bytes and total >= max_bytes:
                return


def load_hub(name: str, config_name: str | None, text_field: str, max_tokens: int | None):
    """A hub dataset, streamed (fineweb-edu is terabytes) into an on-disk Dataset: all of it, or with a token
    budget, about HUB_BYTES_PER_TOKEN bytes of text per token (tokens are counted exactly afterwards)."""
    from datasets import load_dataset
    from datasets.exceptions import DatasetNotFoundError

    local = "--dataset=corpus.txt or --dataset=folder/"
    try:
        stream = load_dataset(name, config_name, split="train", streaming=True)
    except ConnectionError:
        raise UserError(f"{name!r} is not a local file or folder, and the Hugging Face hub cannot be reached to "
                        f"fetch it (offline?); use local text instead: {local}", "Data sources") from None
    except (DatasetNotFoundError, FileNotFoundError):
        raise UserError(f"{name!r} is neither a local file or folder nor a dataset on the Hugging Face hub; "
                        f"check the name, or use local text: {local}", "Data sources") from None
    except ValueError as e:  # e.g. a missing or unknown config name; the first line says which ones exist
        raise UserError(f"hub dataset {name!r}: {str(e).strip().splitlines()[0]}", "Data sources") from None
    return materialize(stream, text_field, max_tokens * HUB_BYTES_PER_TOKEN if max_tokens else None, name)


def materialize(stream, text_field: str, max_bytes: int | None, where: str):
    """A streamed dataset written to Arrow files in the `datasets` cache, never held in memory all at once."""
    from datasets import Dataset
    from datasets.exceptions import DatasetGenerationError

    try:
        return Dataset.from_generator(stream_documents, gen_kwargs={"stream": stream, "text_field": text_field,
                                                                    "max_bytes": max_bytes})
    except DatasetGenerationError as e:
        raise read_error(e, where) from None


def looks_like_path(dataset: str) -> bool:
    """A hub name is "owner/name"; anything else that does not exist locally was meant as a path."""
    return (dataset.startswith((".", "/", "~")) or dataset.endswith("/") or dataset.count("/") > 1
            or "\\" in dataset or builder_for(Path(dataset)) is not None)


def load_corpus(dataset: str, text_field: str = "text", config_name: str | None = None,
                max_tokens: int | None = None):
    """Any source as a datasets.Dataset of documents in a "text" column."""
    from datasets import Dataset

    dataset = str(dataset)
    if dataset == "builtin":
        ds = Dataset.from_dict({"text": list(builtin_documents())})
    elif Path(dataset).expanduser().exists():
        ds = load_local(Path(dataset).expanduser(), text_field)
    elif looks_like_path(dataset):
        raise UserError(f"{dataset}: no such file or folder", "Data sources")
    else:
        ds = load_hub(dataset, config_name, text_field, max_tokens)
    if len(ds) == 0:
        raise UserError(f"{dataset}: no text in it (only empty documents)", "Data sources")
    return ds


def source_identity(dataset: str, text_field: str, config_name: str | None) -> dict:
    """What the cache key knows of a source: local files by path, size and modification time, so an edited
    file is read again; the built-in corpus by Python version (its docstrings change between releases)."""
    if dataset == "builtin":
        return {"builtin": platform.python_version()}
    path = Path(dataset).expanduser()
    if path.exists():
        files = local_files(path)
        stats = [(f.stat(), f.name if f == path else str(f.relative_to(path))) for f in files]
        return {"path": str(path.resolve()), "text_field": text_field,
                "files": [[name, st.st_size, st.st_mtime_ns] for st, name in stats]}
    return {"hub": dataset, "config_name": config_name, "text_field": text_field}


def source_slug(dataset: str) -> str:
    """A readable start for the data folder's name."""
    path = Path(dataset).expanduser()
    name = path.resolve().name if path.exists() else dataset.replace("/", "--")
    for c in COMPRESSIONS:
        name = name.removesuffix(c)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).stem if path.is_file() else name)[:40]
