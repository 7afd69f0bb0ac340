import json

import pytest
import torch

from prune_cli.calibrators.sampling import calibration_windows, evaluation_windows, fingerprint
from prune_cli.calibrators.sources import bundled_text, text_from_dataset, text_from_files
from prune_cli.errors import BadInputError, NotEnoughTextError


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
