"""Where calibration and evaluation text comes from.

* local ``.txt`` files, ``.jsonl`` files (one JSON object a line, ``column`` names the field),
* a ``datasets`` dataset (a hub name when online; a local file or folder always),
* the bundled default: the Python documentation topics that ship with CPython
  (``pydoc_data.topics``), split by topic into disjoint calibration and evaluation parts,
  so it is available offline right after install.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from prune_cli.errors import BadInputError, NotEnoughTextError

log = logging.getLogger(__name__)

DOC_SEPARATOR = "\n\n"
# Every EVAL_EVERY-th run of PARAGRAPHS_PER_RUN paragraphs is held out for evaluation.
EVAL_EVERY = 4
PARAGRAPHS_PER_RUN = 16

# A file whose undecodable bytes exceed this share of its size is refused as not text. Text in
# Latin-1 / cp1252 in a Western European language has its accented letters at about 1-4% of its
# bytes (French and Portuguese are the densest), so it stays under the bar and is read with a
# warning; random or compressed binary data without NUL bytes has about half of its bytes
# undecodable, and text in a non-Latin legacy encoding (cp1251, Shift-JIS, ...) far more than
# 5%: reading those with U+FFFD replacements would calibrate on noise.
MAX_UNDECODABLE_SHARE = 0.05
TEXT_HINT = "pass UTF-8 text (.txt) or .jsonl files; convert other encodings with `iconv -t UTF-8`"
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of a bad byte


@dataclass(frozen=True)
class Text:
    """A body of text and where it came from (for the report's fingerprint)."""

    text: str
    source: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:16]


def bundled_text(part: str) -> Text:
    """The CPython pydoc topics, ``part`` = "calibration" or "evaluation".

    Many paragraphs repeat across topics (``specialnames`` contains ``numeric-types``, ...),
    so a split by topic would leak evaluation text into calibration. Instead the topics are
    read in sorted key order as one stream of paragraphs, each kept only at its first
    appearance; the stream is cut into runs of ``PARAGRAPHS_PER_RUN`` paragraphs and every
    ``EVAL_EVERY``-th run goes to evaluation. The two parts share no paragraph.
    """
    from pydoc_data.topics import topics

    if part not in ("calibration", "evaluation"):
        raise ValueError(part)
    seen: set[str] = set()
    paragraphs: list[str] = []
    for key in sorted(topics):
        for paragraph in topics[key].split(DOC_SEPARATOR):
            paragraph = paragraph.strip("\n")
            if paragraph.strip() and paragraph not in seen:
                seen.add(paragraph)
                paragraphs.append(paragraph)
    runs = [paragraphs[i : i + PARAGRAPHS_PER_RUN] for i in range(0, len(paragraphs), PARAGRAPHS_PER_RUN)]
    held_out = part == "evaluation"
    chosen = [p for i, run in enumerate(runs) if (i % EVAL_EVERY == EVAL_EVERY - 1) == held_out for p in run]
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return Text(DOC_SEPARATOR.join(chosen), f"bundled:pydoc-topics-py{version}:{part}")


def decode_text_file(path: Path) -> str:
    """The text of ``path`` read as UTF-8, refusing files that are not text.

    Decoding with ``errors="replace"`` alone would turn an executable or an archive passed as
    ``--calib-text`` into calibration "text" made of U+FFFD, and would hide a wrong encoding.
    So the file is read as bytes and

    * a file containing NUL bytes is refused (:class:`BadInputError`): text never contains
      them, while binary formats and UTF-16/32 text almost always do;
    * a file in which more than ``MAX_UNDECODABLE_SHARE`` of the bytes are not valid UTF-8 is
      refused as well (binary data without NULs, or text in a non-Latin legacy encoding);
    * a file with fewer undecodable bytes (typically Latin-1 text with a few accented letters)
      is decoded with U+FFFD replacement characters and a WARNING names it and the count.

    Newlines are translated like :meth:`Path.read_text` does ("\\r\\n" and "\\r" become "\\n"),
    so valid UTF-8 gives exactly the text, and the fingerprint, it always gave.
    """
    data = Path(path).read_bytes()
    nul = data.find(b"\x00")
    if nul >= 0:
        raise BadInputError(f"{path} is a binary file, not text: it contains NUL bytes (the first at byte {nul})",
                            hint=TEXT_HINT)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        escaped = data.decode("utf-8", errors="surrogateescape")  # one lone surrogate per bad byte
        bad = len(escaped) - len(_ESCAPED_BYTE.sub("", escaped))
        if bad > MAX_UNDECODABLE_SHARE * len(data):
            raise BadInputError(
                f"{path} is not text: {bad} of its {len(data)} bytes ({bad / len(data):.0%}) are not valid UTF-8",
                hint=TEXT_HINT,
            ) from None
        log.warning("%s: %d byte%s not valid UTF-8 (not UTF-8 text?), read as U+FFFD replacement characters",
                    path, bad, " is" if bad == 1 else "s are")
        text = data.decode("utf-8", errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_jsonl(path: Path, column: str, chat=None) -> list[str]:
    """The ``column`` field of every JSON object in the ``.jsonl`` file ``path`` (blank lines
    skipped). With ``chat`` (``messages -> str``, a tokenizer's chat template), rows holding a
    ``messages`` list (``[{"role": ..., "content": ...}, ...]``) are rendered by it instead."""
    docs = []
    for line_no, line in enumerate(decode_text_file(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInputError(
                f"{path}:{line_no}: not valid JSON ({exc.msg})",
                hint="a .jsonl file holds one JSON object per line",
            ) from None
        if chat is not None and isinstance(record, dict) and "messages" in record:
            docs.append(_render_chat(chat, record["messages"], f"{path}:{line_no}"))
            continue
        if not isinstance(record, dict) or column not in record:
            has_messages = isinstance(record, dict) and "messages" in record
            raise BadInputError(
                f"{path}:{line_no}: no field {column!r}",
                hint="render chat rows with --calib-chat-template" if has_messages else "name the text field with --calib-column",
            )
        docs.append(_text_field(record[column], column, f"{path}:{line_no}"))
    return docs


def _text_field(value, column: str, where: str) -> str:
    """The ``column`` field of one ``.jsonl`` row, which must be a string: a number, ``null``, a
    list or an object would otherwise be calibrated on as its Python spelling ("5", "None")."""
    if not isinstance(value, str):
        from prune_cli.settings import kind_of

        raise BadInputError(f"{where}: field {column!r} is {kind_of(value)}, not text ({json.dumps(value)[:40]})",
                            hint=f"each row's {column!r} field must be a JSON string, e.g. {{\"{column}\": \"...\"}}")
    return value


def _render_chat(chat, messages, where: str) -> str:
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise BadInputError(f"{where}: messages must be a list of {{role, content}} objects")
    try:
        return chat(messages)
    except Exception as exc:  # noqa: BLE001 - a template's own errors (e.g. roles out of order)
        raise BadInputError(f"{where}: the chat template cannot render these messages ({exc})") from None


def text_from_files(paths: list[Path], column: str = "text", chat=None) -> Text:
    """Concatenate local ``.txt`` / ``.jsonl`` files (documents separated by a blank line).

    Each file must be UTF-8 text (see :func:`decode_text_file`); all of them empty is an error.
    ``chat``: render ``.jsonl`` rows with ``messages`` by it (see :func:`_read_jsonl`)."""
    docs: list[str] = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise BadInputError(f"text file not found: {path}", hint="check the path")
        if path.suffix == ".jsonl":
            docs.extend(_read_jsonl(path, column, chat))
        else:
            docs.append(decode_text_file(path))
    text = DOC_SEPARATOR.join(d for d in docs if d)
    if not text.strip():
        raise NotEnoughTextError(f"no text in {', '.join(map(str, paths))}", hint="give non-empty files")
    return Text(text, "files:" + ",".join(str(p) for p in paths))


_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def text_from_dataset(name: str, split: str = "train", column: str = "text", offline: bool = False) -> Text:
    """Load ``NAME[:CONFIG]`` through ``datasets``; a local file/folder path always works offline."""
    try:
        import datasets
    except ImportError:
        raise BadInputError(
            "--calib-dataset needs the 'datasets' package",
            hint="pip install 'prune-cli[data]', or pass --calib-text FILE",
        ) from None
    local = Path(name)
    try:
        if local.is_file():
            builder = _LOCAL_BUILDERS.get(local.suffix)
            if builder is None:
                raise BadInputError(f"cannot read a dataset from {local}", hint="use .json/.jsonl/.csv/.parquet/.txt")
            ds = datasets.load_dataset(builder, data_files=str(local), split=split)
        elif local.is_dir():
            ds = datasets.load_dataset(str(local), split=split)
        else:
            if offline:
                raise BadInputError(
                    f"dataset {name!r} is not a local path and the network is off (--offline / HF_HUB_OFFLINE)",
                    hint="pass a local file or folder, or --calib-text FILE",
                )
            dataset_name, _, config = name.partition(":")
            ds = datasets.load_dataset(dataset_name, config or None, split=split)
    except BadInputError:
        raise
    except Exception as exc:  # datasets raises many types: report one line
        raise BadInputError(f"cannot load dataset {name!r}: {exc}".splitlines()[0], hint="check name, config and split") from None
    if column not in ds.column_names:
        raise BadInputError(
            f"dataset {name!r} has no column {column!r} (columns: {', '.join(ds.column_names)})",
            hint="pick one with --calib-column",
        )
    text = DOC_SEPARATOR.join(str(t) for t in ds[column] if t)
    return Text(text, f"dataset:{name}:{split}:{column}")
