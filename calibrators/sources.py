"""Where calibration and evaluation text comes from.

* local ``.txt`` files, ``.jsonl`` files (one JSON object a line, ``column`` names the field),
* a ``datasets`` dataset (a hub name when online; a local file or folder always),
* the bundled default: the Python documentation topics that ship with CPython
  (``pydoc_data.topics``), split by topic into disjoint calibration and evaluation parts,
  so it is available offline right after install.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from pydoc_data.topics import topics

from prune_cli.core.errors import BadInputError, NotEnoughTextError, kind_of

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


# Texts of at most WHOLE_TEXT_CHARS characters are held and tokenised whole, as they always were
# (the same windows, fingerprints and resume states). Longer ones are kept on disk and read again
# when tokenised, in pieces of about PIECE_CHARS characters, only as far as the windows need
# (calibrators.sampling.tokenize): tokenising a whole 20 MB file at once took 4.8 GB.
WHOLE_TEXT_CHARS = 2 * 2**20
PIECE_CHARS = 256 * 2**10
READ_CHARS = 2**20  # a .txt file is read this many characters at a time


@dataclass(frozen=True)
class Text:
    """A body of text and where it came from (for the report's fingerprint)."""

    text: str
    source: str

    streamed = False  # held whole (see StreamedText)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:16]

    def pieces(self, size: int | None = None) -> Iterator[str]:
        """The text in consecutive pieces of about ``size`` characters (default ``PIECE_CHARS``,
        see :func:`split_pieces`)."""
        return split_pieces([self.text], size or PIECE_CHARS)


class StreamedText:
    """A text too long to hold whole: ``blocks()`` reads it again, as consecutive strings that
    join to the text, each time it is called. Its length and hash were taken by a first full
    read, which also checked every file and row (so what is refused is refused before any
    work, wherever in the file it is)."""

    streamed = True

    def __init__(self, source: str, blocks: Callable[[], Iterable[str]], chars: int, sha256: str):
        self.source, self._blocks, self.chars, self.sha256 = source, blocks, chars, sha256

    @property
    def text(self) -> str:
        """The whole text (reads all of it: for small checks, not for tokenising)."""
        return "".join(self._blocks())

    def pieces(self, size: int | None = None) -> Iterator[str]:
        return split_pieces(self._blocks(), size or PIECE_CHARS)


# A piece ends before a space between two word characters: a boundary of the pre-tokenisers of
# byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM2, Qwen), so tokenising the pieces one by one
# gives the same tokens as tokenising the text whole (a SentencePiece tokenizer may add a word
# start at each piece's beginning: one token in ~PIECE_CHARS characters differs).
_CUT = re.compile(r"(?<=\w) (?=\w)")
_SPACE = re.compile(r"(?<=\S)\s")


def split_pieces(blocks: Iterable[str], size: int) -> Iterator[str]:
    """The concatenation of ``blocks`` in consecutive pieces of at most about ``size``
    characters, each cut at the last space between two word characters in its second half (else
    before the last whitespace, else at ``size``: one long line without spaces is cut anyway)."""
    buffer = ""
    for block in blocks:
        buffer += block
        while len(buffer) > size:
            cut = _cut(buffer, size)
            yield buffer[:cut]
            buffer = buffer[cut:]
    if buffer:
        yield buffer


def _cut(buffer: str, size: int) -> int:
    for pattern in (_CUT, _SPACE):
        matches = list(pattern.finditer(buffer, size // 2, size))
        if matches:
            return matches[-1].start()
    return size


def bundled_text(part: str) -> Text:
    """The CPython pydoc topics, ``part`` = "calibration" or "evaluation".

    Many paragraphs repeat across topics (``specialnames`` contains ``numeric-types``, ...),
    so a split by topic would leak evaluation text into calibration. Instead the topics are
    read in sorted key order as one stream of paragraphs, each kept only at its first
    appearance; the stream is cut into runs of ``PARAGRAPHS_PER_RUN`` paragraphs and every
    ``EVAL_EVERY``-th run goes to evaluation. The two parts share no paragraph.
    """

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
    So the file is first checked by :func:`check_text_bytes`, then read with newlines translated
    like :meth:`Path.read_text` does ("\\r\\n" and "\\r" become "\\n"), so valid UTF-8 gives
    exactly the text, and the fingerprint, it always gave.
    """
    check_text_bytes(path)
    return "".join(_read_blocks(Path(path)))


def check_text_bytes(path: Path) -> None:
    """Refuse a file that is not UTF-8 text, reading it in blocks (its size does not matter):

    * a file containing NUL bytes is refused (:class:`BadInputError`): text never contains
      them, while binary formats and UTF-16/32 text almost always do;
    * a file in which more than ``MAX_UNDECODABLE_SHARE`` of the bytes are not valid UTF-8 is
      refused as well (binary data without NULs, or text in a non-Latin legacy encoding);
    * a file with fewer undecodable bytes (typically Latin-1 text with a few accented letters)
      is read with U+FFFD replacement characters (:func:`_read_blocks`) and a WARNING names it
      and the count.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")  # one lone surrogate per bad byte
    size = bad = 0
    with open(path, "rb") as file:
        while block := file.read(READ_CHARS):
            nul = block.find(b"\x00")
            if nul >= 0:
                raise BadInputError(f"{path} is a binary file, not text: it contains NUL bytes "
                                    f"(the first at byte {size + nul})", hint=TEXT_HINT)
            bad += len(_ESCAPED_BYTE.findall(decoder.decode(block)))
            size += len(block)
    bad += len(_ESCAPED_BYTE.findall(decoder.decode(b"", final=True)))
    if bad > MAX_UNDECODABLE_SHARE * size:
        raise BadInputError(f"{path} is not text: {bad} of its {size} bytes ({bad / size:.0%}) are not valid UTF-8",
                            hint=TEXT_HINT)
    if bad:
        log.warning("%s: %d byte%s not valid UTF-8 (not UTF-8 text?), read as U+FFFD replacement characters",
                    path, bad, " is" if bad == 1 else "s are")


def _read_blocks(path: Path) -> Iterator[str]:
    """The text of a file checked by :func:`check_text_bytes`, ``READ_CHARS`` characters at a
    time: UTF-8, bad bytes as U+FFFD, newlines translated (exactly what decoding the whole file
    with ``errors="replace"`` and replacing "\\r\\n" and "\\r" by "\\n" gives)."""
    with open(path, encoding="utf-8", errors="replace", newline=None) as file:
        while block := file.read(READ_CHARS):
            yield block


def _jsonl_rows(path: Path, column: str, chat=None) -> Iterator[str]:
    """The ``column`` field of every JSON object in the ``.jsonl`` file ``path``, one line at
    a time (blank lines skipped). With ``chat`` (``messages -> str``, a tokenizer's chat
    template), rows holding a ``messages`` list (``[{"role": ..., "content": ...}, ...]``) are
    rendered by it instead."""
    with open(path, encoding="utf-8", errors="replace", newline=None) as file:
        for line_no, line in enumerate(file, 1):
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
                yield _render_chat(chat, record["messages"], f"{path}:{line_no}")
                continue
            if not isinstance(record, dict) or column not in record:
                has_messages = isinstance(record, dict) and "messages" in record
                raise BadInputError(
                    f"{path}:{line_no}: no field {column!r}",
                    hint="render chat rows with --calib-chat-template" if has_messages else "name the text field with --calib-column",
                )
            yield _text_field(record[column], column, f"{path}:{line_no}")


def _read_jsonl(path: Path, column: str, chat=None) -> list[str]:
    """Every row's text of the ``.jsonl`` file ``path`` (see :func:`_jsonl_rows`)."""
    check_text_bytes(path)
    return list(_jsonl_rows(path, column, chat))


def _text_field(value, column: str, where: str) -> str:
    """The ``column`` field of one ``.jsonl`` row, which must be a string: a number, ``null``, a
    list or an object would otherwise be calibrated on as its Python spelling ("5", "None")."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:  # a "\\udXXX" escape without its pair
            raise BadInputError(f"{where}: field {column!r} is not valid text (a lone surrogate "
                                f"{value[exc.start]!r} at character {exc.start})", hint=TEXT_HINT) from None
    else:

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


def text_from_files(paths: list[Path], column: str = "text", chat=None) -> Text | StreamedText:
    """Concatenate local ``.txt`` / ``.jsonl`` files (documents separated by a blank line).

    Each file must be UTF-8 text (see :func:`check_text_bytes`); all of them empty is an error.
    ``chat``: render ``.jsonl`` rows with ``messages`` by it (see :func:`_jsonl_rows`). Files are
    read in blocks; a text longer than ``WHOLE_TEXT_CHARS`` stays on disk (:class:`StreamedText`)."""
    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.is_file():
            raise BadInputError(f"text file not found: {path}", hint="check the path")
        check_text_bytes(path)

    def documents() -> Iterator[Iterable[str]]:
        for path in paths:
            if path.suffix == ".jsonl":
                yield from ((row,) for row in _jsonl_rows(path, column, chat))
            else:
                yield _read_blocks(path)

    return _measured(lambda: _joined(documents()), "files:" + ",".join(str(p) for p in paths),
                     NotEnoughTextError(f"no text in {', '.join(map(str, paths))}", hint="give non-empty files"))


def _joined(documents: Iterable[Iterable[str]]) -> Iterator[str]:
    """The blocks of ``DOC_SEPARATOR.join(documents)``, each document given as its blocks;
    empty documents are left out (no separator for them)."""
    started = False
    for document in documents:
        opened = False
        for block in document:
            if not block:
                continue
            if not opened:
                if started:
                    yield DOC_SEPARATOR
                opened = started = True
            yield block


def _measured(blocks: Callable[[], Iterable[str]], source: str, empty: BadInputError) -> Text | StreamedText:
    """Read ``blocks()`` once, checking every file and row on the way: a :class:`Text` holding
    it when it has at most ``WHOLE_TEXT_CHARS`` characters, else a :class:`StreamedText` that
    reads it again when tokenised. Raises ``empty`` when it is blank."""
    digest, chars, held, blank = hashlib.sha256(), 0, [], True
    for block in blocks():
        digest.update(block.encode("utf-8"))
        chars += len(block)
        blank = blank and block.isspace()
        if held is not None:
            held.append(block)
            if chars > WHOLE_TEXT_CHARS:
                held = None  # too long to hold: read again when tokenised
    if blank:
        raise empty
    if held is not None:
        return Text("".join(held), source)
    return StreamedText(source, blocks, chars, digest.hexdigest()[:16])


_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def text_from_dataset(name: str, split: str = "train", column: str = "text", offline: bool = False) -> Text | StreamedText:
    """Load ``NAME[:CONFIG]`` through ``datasets``; a local file/folder path always works offline."""
    try:
        import datasets  # noqa: PLC0415 - optional dependency (the data extra)
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
    feature = ds.features[column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        kind = feature.dtype if isinstance(feature, datasets.Value) else type(feature).__name__
        raise BadInputError(f"dataset {name!r} column {column!r} holds {kind} values, not text",
                            hint=f"pick a text column with --calib-column (columns: {', '.join(ds.column_names)})")
    rows = ds.select_columns([column])

    def blocks() -> Iterator[str]:  # the rows a batch at a time, not the whole column in memory
        return _joined((t,) for batch in rows.iter(batch_size=1000) for t in batch[column] if t)

    return _measured(blocks, f"dataset:{name}:{split}:{column}",
                     NotEnoughTextError(f"dataset {name!r} has no text in column {column!r} of split {split!r}",
                                        hint="pick another --calib-column or --calib-split"))
