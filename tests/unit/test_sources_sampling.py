import json
import random
from pathlib import Path

import pytest
import torch

from prune_cli.calibrators.sampling import (
    adds_bos,
    calibration_windows,
    evaluation_windows,
    fingerprint,
    resolve_bos,
    validation_windows,
)
from prune_cli.calibrators.sources import bundled_text, text_from_dataset, text_from_files
from prune_cli.core.errors import BadInputError, NotEnoughTextError, RecipeError


def test_bundled_parts_are_disjoint_and_nonempty():
    cal, ev = bundled_text("calibration"), bundled_text("evaluation")
    assert len(cal.text) > 100_000 and len(ev.text) > 50_000
    cal_docs, ev_docs = set(cal.text.split("\n\n")), set(ev.text.split("\n\n"))
    assert not cal_docs & ev_docs
    assert cal.source.endswith(":calibration") and ev.source.endswith(":evaluation")


def test_calibration_windows_reproducible_and_distinct():
    ids = torch.arange(10_000)
    a = calibration_windows(ids, 8, 100, seed=3)
    b = calibration_windows(ids, 8, 100, seed=3)
    c = calibration_windows(ids, 8, 100, seed=4)
    assert a.shape == (8, 100) and torch.equal(a, b) and not torch.equal(a, c)
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)
    # non-overlapping: no token id appears twice (ids are unique here)
    assert a.unique().numel() == a.numel()


def test_too_little_text_is_an_error():
    with pytest.raises(NotEnoughTextError, match="room for 9 windows"):
        calibration_windows(torch.arange(999), 10, 100, seed=0)
    with pytest.raises(NotEnoughTextError):
        evaluation_windows(torch.arange(50), 1, 100)


def test_evaluation_windows_consecutive():
    w = evaluation_windows(torch.arange(1000), 3, 10)
    assert w[1, 0].item() == 10 and w.shape == (3, 10)


def test_text_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "from jsonl"}) + "\n\n" + json.dumps({"body": "two"}) + "\n")
    t = text_from_files([tmp_path / "a.txt", tmp_path / "b.jsonl"], column="body")
    assert t.text == "hello world\n\nfrom jsonl\n\ntwo"
    with pytest.raises(BadInputError, match="no field 'text'"):
        text_from_files([tmp_path / "b.jsonl"])
    with pytest.raises(BadInputError, match="not found"):
        text_from_files([tmp_path / "missing.txt"])
    (tmp_path / "bad.jsonl").write_text("{nope\n")
    with pytest.raises(BadInputError, match="not valid JSON"):
        text_from_files([tmp_path / "bad.jsonl"])


def test_dataset_source_offline_refuses_hub_name():
    pytest.importorskip("datasets")
    with pytest.raises(BadInputError, match="network is off"):
        text_from_dataset("some/hub-dataset", offline=True)


def test_dataset_source_local_file(tmp_path):
    pytest.importorskip("datasets")
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"content": f"line {i}"}) for i in range(3)))
    t = text_from_dataset(str(path), column="content")
    assert t.text == "line 0\n\nline 1\n\nline 2"
    with pytest.raises(BadInputError, match="no column"):
        text_from_dataset(str(path), column="text")


# --- binary and non-UTF-8 text files -------------------------------------------------------------

ASCII_PROSE = "Pruning removes the weights that matter least for the next token.\n" * 40


def test_binary_file_with_nul_bytes_refused(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"ELF\x02\x01\x01" + bytes(range(256)) * 8)
    with pytest.raises(BadInputError, match="NUL") as info:
        text_from_files([path])
    assert str(path) in str(info.value)
    assert info.value.exit_code == 2


def test_mostly_invalid_utf8_refused(tmp_path):
    data = bytes(b or 1 for b in random.Random(0).randbytes(4096))  # random bytes, no NUL
    path = tmp_path / "noise.txt"
    path.write_bytes(data)
    with pytest.raises(BadInputError, match="not valid UTF-8") as info:
        text_from_files([path])
    assert str(path) in str(info.value)


def test_latin1_text_accepted_with_warning(tmp_path, caplog):
    path = tmp_path / "latin1.txt"
    path.write_bytes((ASCII_PROSE + "Un café crème, naïve façade.\n").encode("latin-1"))
    with caplog.at_level("WARNING", logger="prune_cli.calibrators.sources"):
        t = text_from_files([path])
    assert "Un caf\ufffd cr\ufffdme, na\ufffdve fa\ufffdade." in t.text
    assert t.text.startswith(ASCII_PROSE)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and str(path) in warnings[0] and "4 bytes" in warnings[0]


def test_valid_utf8_text_unchanged(tmp_path, caplog):
    # BOM, multi-byte letters, CRLF / CR newlines, U+2028 and a literal U+FFFD: read exactly as before
    text = "\ufeffh\u00e9llo w\u00f6rld \u4e16\u754c \U0001f600\r\nsecond\rthird\u2028same line \ufffd\n"
    path = tmp_path / "utf8.txt"
    path.write_bytes(text.encode("utf-8"))
    with caplog.at_level("WARNING"):
        t = text_from_files([path])
    assert t.text == path.read_text(encoding="utf-8")  # what the reader did before: universal newlines
    assert t.text == text.replace("\r\n", "\n").replace("\r", "\n")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_whitespace_only_file_is_not_enough_text(tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("  \n\n\t\n")
    with pytest.raises(NotEnoughTextError, match="no text"):
        text_from_files([path])


def test_binary_jsonl_refused(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps({"text": "ok"}).encode() + b"\n\x00\x00\x00\x00\n")
    with pytest.raises(BadInputError, match="NUL") as info:
        text_from_files([path])
    assert str(path) in str(info.value)
    noise = tmp_path / "noise.jsonl"
    noise.write_bytes(bytes(b or 1 for b in random.Random(1).randbytes(2048)))
    with pytest.raises(BadInputError, match="not valid UTF-8") as info:
        text_from_files([noise])
    assert str(noise) in str(info.value)


def test_latin1_jsonl_decoded_with_warning(tmp_path, caplog):
    path = tmp_path / "latin1.jsonl"
    lines = [json.dumps({"text": ASCII_PROSE}), '{"text": "caf\u00e9"}']
    path.write_bytes("\r\n".join(lines).encode("latin-1"))
    with caplog.at_level("WARNING", logger="prune_cli.calibrators.sources"):
        t = text_from_files([path])
    assert t.text == ASCII_PROSE + "\n\ncaf\ufffd"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and str(path) in warnings[0] and "1 byte" in warnings[0]


def test_windows_with_bos_start_with_it_and_keep_their_length():
    ids = torch.arange(10, 10_010)
    plain = calibration_windows(ids, 8, 100, seed=3)
    with_bos = calibration_windows(ids, 8, 100, seed=3, bos=1)
    assert with_bos.shape == plain.shape == (8, 100)
    assert (with_bos[:, 0] == 1).all() and not (plain[:, 0] == 1).any()
    body = with_bos[:, 1:]
    assert body.unique().numel() == body.numel()  # text slots of 99 tokens, still disjoint
    assert ((body[:, 1:] - body[:, :-1]) == 1).all()  # each a consecutive run of the text
    assert fingerprint(plain) != fingerprint(with_bos)
    ev = evaluation_windows(ids, 3, 10, bos=1)
    assert ev.shape == (3, 10) and (ev[:, 0] == 1).all() and ev[1, 1].item() == 10 + 9
    val = validation_windows(ids, 8, 2, 100, seed=3, bos=1)
    assert (val[:, 0] == 1).all() and not set(val[:, 1:].flatten().tolist()) & set(body.flatten().tolist())


def test_windows_without_bos_are_unchanged():
    """bos=None gives exactly the plain slots (numbers measured before BOS handling stay comparable)."""
    ids = torch.arange(10_000)
    w = calibration_windows(ids, 8, 100, seed=3, bos=None)
    order = torch.randperm(100, generator=torch.Generator().manual_seed(3))[:8]
    assert torch.equal(w, torch.stack([ids[s * 100 : s * 100 + 100] for s in order.tolist()]))
    assert torch.equal(evaluation_windows(ids, 3, 10, bos=None), ids[:30].reshape(3, 10))


def test_bos_needs_room_for_text():
    with pytest.raises(NotEnoughTextError, match="room for 9 windows"):
        calibration_windows(torch.arange(99 * 9 + 5), 10, 100, seed=0, bos=1)  # 9 slots of 99 tokens


def test_resolve_bos_follows_the_tokenizer():
    from tests.tiny_models import tiny_tokenizer

    plain, adding = tiny_tokenizer(), tiny_tokenizer(adds_bos=True)
    assert not adds_bos(plain) and adds_bos(adding)
    bos = adding.bos_token_id
    assert resolve_bos(plain, "auto") is None and resolve_bos(adding, "auto") == bos
    assert resolve_bos(plain, "always") == plain.bos_token_id and resolve_bos(adding, "never") is None
    assert adding("The cat")["input_ids"][0] == bos  # the convention auto follows


def test_resolve_bos_refusals():
    from tests.tiny_models import tiny_tokenizer

    with pytest.raises(RecipeError, match="bos must be one of"):
        resolve_bos(tiny_tokenizer(), "sometimes")

    class NoBos:
        bos_token_id = None

    with pytest.raises(RecipeError, match="no BOS token"):
        resolve_bos(NoBos(), "always")
    assert resolve_bos(NoBos(), "auto") is None


@pytest.mark.parametrize("value, kind", [(5, "an integer"), (None, "null"), (1.5, "a number"), (True, "a boolean"),
                                         (["a"], "a list"), ({"a": 1}, "a mapping")])
def test_jsonl_text_field_must_be_a_string(tmp_path, value, kind):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": value}) + "\n")
    with pytest.raises(BadInputError, match=f"rows.jsonl:2: field 'text' is {kind}, not text"):
        text_from_files([path])


# --- long texts: read in blocks, tokenised a piece at a time, only as far as the windows need ------


@pytest.fixture()
def small_limits(monkeypatch):
    """Thresholds of a few kilobytes, so that small files take the streamed path."""
    from prune_cli.calibrators import sources

    monkeypatch.setattr(sources, "WHOLE_TEXT_CHARS", 5_000)
    monkeypatch.setattr(sources, "READ_CHARS", 4_097)  # odd: a "\r\n" falls across two blocks
    monkeypatch.setattr(sources, "PIECE_CHARS", 3_000)
    return sources


def _prose(chars: int) -> str:
    text = bundled_text("calibration").text
    return (text * (chars // len(text) + 1))[:chars]


class _Recording:
    """A tokenizer that records the length of every text it is given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def __call__(self, text, **kwargs):
        self.lengths.append(len(text))
        return self.tokenizer(text, **kwargs)


def test_a_long_text_stays_on_disk_and_reads_back_exactly(tmp_path, small_limits, caplog):
    from prune_cli.calibrators.sources import StreamedText, Text

    txt, rows = tmp_path / "a.txt", tmp_path / "b.jsonl"
    txt.write_bytes(_prose(20_000).replace("\n", "\r\n").encode() + b"\r\ncaf\xe9\r")
    rows.write_text("\n".join(json.dumps({"text": p}) for p in _prose(9_000).split("\n\n")) + "\n\n")
    streamed = text_from_files([txt, rows])
    small_limits.WHOLE_TEXT_CHARS = 10**9
    with caplog.at_level("WARNING", logger="prune_cli.calibrators.sources"):
        whole = text_from_files([txt, rows])
    assert isinstance(streamed, StreamedText) and isinstance(whole, Text)
    assert streamed.text == whole.text and streamed.sha256 == whole.sha256 and streamed.chars == len(whole.text)
    assert "\r" not in whole.text and whole.text.count("\ufffd") == 1


def test_pieces_join_to_the_text_and_cut_between_words():
    from prune_cli.calibrators.sources import split_pieces

    text = _prose(50_000)
    pieces = list(split_pieces([text[i : i + 777] for i in range(0, len(text), 777)], 4_000))
    assert "".join(pieces) == text and max(map(len, pieces)) <= 4_000
    assert all(p[-1].isalnum() and n.startswith(" ") for p, n in zip(pieces, pieces[1:]))
    one_word = list(split_pieces(["x" * 10_001], 4_000))  # no whitespace at all: cut anyway
    assert list(map(len, one_word)) == [4_000, 4_000, 2_001]


def test_piecewise_tokens_equal_whole_text_tokens_for_byte_level_bpe():
    """Cut between two words, the pieces of a text tokenise to the same ids as the whole text
    (the tiny test tokenizer is a byte-level BPE, like GPT-2's, Llama 3's and SmolLM2's)."""
    from prune_cli.calibrators.sources import split_pieces
    from tests.tiny_models import tiny_tokenizer

    tokenizer, text = tiny_tokenizer(), bundled_text("calibration").text
    pieces = list(split_pieces([text], 5_000))
    assert len(pieces) > 20
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert sum((tokenizer(p, add_special_tokens=False)["input_ids"] for p in pieces), []) == whole


def test_a_long_text_is_tokenised_in_bounded_pieces_only_as_far_as_needed(tmp_path, small_limits, monkeypatch):
    from prune_cli.calibrators import sampling
    from tests.tiny_models import tiny_tokenizer

    monkeypatch.setattr(sampling, "MIN_STREAMED_TOKENS", 1_000)
    path = tmp_path / "long.txt"
    path.write_text(_prose(400_000).replace("\n", " "))  # one long line
    tokenizer = _Recording(tiny_tokenizer())
    ids = sampling.calibration_ids(tokenizer, text_from_files([path]), 8, 32, None)
    assert max(tokenizer.lengths) <= 3_000  # PIECE_CHARS
    assert sum(tokenizer.lengths) < 20_000  # 4 x 8 x 32 tokens' worth, not the 400 000 characters
    assert ids.numel() >= sampling.SLACK * 8 * 32
    windows = calibration_windows(ids, 8, 32, seed=0)
    assert windows.shape == (8, 32) and windows.unique(dim=0).shape[0] == 8
    tokenizer.lengths.clear()
    ev = sampling.evaluation_ids(tokenizer, text_from_files([path]), 2, 16, None)
    assert ev.numel() >= 32 and len(tokenizer.lengths) == 1  # the first piece holds the two windows


def test_a_short_text_is_tokenised_whole_as_before(tmp_path):
    """Under WHOLE_TEXT_CHARS nothing changed: one tokenizer call on the whole text, the same
    ids (so the same windows, fingerprints and resume states as before)."""
    from prune_cli.calibrators import sampling
    from tests.tiny_models import tiny_tokenizer

    path = tmp_path / "a.txt"
    path.write_text(_prose(100_000))
    tokenizer = _Recording(tiny_tokenizer())
    ids = sampling.calibration_ids(tokenizer, text_from_files([path]), 4, 64, None)
    assert tokenizer.lengths == [100_000]
    assert ids.tolist() == tiny_tokenizer()(path.read_text(), add_special_tokens=False)["input_ids"]


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_calibration_file(tmp_path):
    """A 30 MB --calib-text (one 10 MB line among paragraphs) costs about what a 100 kB one does:
    read in blocks and tokenised only as far as 2 windows of 64 tokens need. (Tokenised whole,
    as it was, 30 MB took several GB.)"""
    import subprocess
    import sys

    script = (
        "import resource, sys\n"
        "from prune_cli.calibrators.sampling import calibration_ids, calibration_windows\n"
        "from prune_cli.calibrators.sources import text_from_files\n"
        "from tests.tiny_models import tiny_tokenizer\n"
        "tokenizer = tiny_tokenizer()\n"
        "ids = calibration_ids(tokenizer, text_from_files([sys.argv[1]]), 2, 64)\n"
        "print(calibration_windows(ids, 2, 64, 0).shape[0], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    small, big = tmp_path / "small.txt", tmp_path / "big.txt"
    small.write_text(_prose(100_000))
    paragraphs = _prose(10_000_000)
    with big.open("w") as f:
        f.write(paragraphs)
        f.write("\n\n" + paragraphs.replace("\n", " ") + "\n\n")  # one 10 MB line
        f.write(paragraphs)
    assert big.stat().st_size > 29_000_000
    root = Path(__file__).resolve().parents[2]
    peaks = {}
    for path in (small, big):
        out = subprocess.run([sys.executable, "-c", script, str(path)], cwd=root, capture_output=True, text=True,
                             check=True).stdout.split()
        assert out[0] == "2"
        peaks[path.name] = int(out[1]) * 1024  # ru_maxrss: kilobytes on Linux
    assert peaks["big.txt"] - peaks["small.txt"] < 400 * 2**20, peaks


def test_dataset_column_must_hold_text(tmp_path):
    pytest.importorskip("datasets")
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"label": i, "content": f"line {i}"}) for i in range(3)))
    with pytest.raises(BadInputError, match="column 'label' holds int64 values, not text"):
        text_from_dataset(str(path), column="label")


def test_dataset_read_in_batches_like_the_whole_column(tmp_path, small_limits):
    from prune_cli.calibrators.sources import StreamedText

    pytest.importorskip("datasets")
    path = tmp_path / "d.jsonl"
    rows = [p for p in _prose(30_000).split("\n\n")] + [None, ""]
    path.write_text("\n".join(json.dumps({"content": r}) for r in rows))
    t = text_from_dataset(str(path), column="content")
    assert isinstance(t, StreamedText) and t.text == "\n\n".join(r for r in rows if r)
