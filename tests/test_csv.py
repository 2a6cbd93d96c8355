"""CSV readers keep newlines inside quoted fields (issue 11, item 8): calibration files, pair
files and multiple-choice files alike."""

from __future__ import annotations

import csv

import pytest

from maskstore.build import calibration as cal
from maskstore.errors import MaskstoreError


def _write(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_quoted_newlines_survive_calibration_and_pair_files(tmp_path):
    q = "Would you like to be wealthy?\nAnswer:"
    p = _write(tmp_path / "pairs.csv", ["question", "matching", "not_matching"], [[q, "Yes", "No"]])
    pos, neg = cal.read_pair_csv(p)
    assert pos[0].prompt == q and "\n" in pos[0].prompt and neg[0].text == "No"
    s = _write(tmp_path / "s.csv", ["text"], [["line one\nline two"], ["plain"]])
    assert [x.text for x in cal.read_samples(s)] == ["line one\nline two", "plain"]


def test_quoted_newlines_survive_multiple_choice_files(tmp_path):
    from maskstore.compare.evaluate import read_mc

    q = "Pick one:\n(A) quiet\n(B) loud"
    p = _write(tmp_path / "mc.csv", ["question", "A", "B", "matching"], [[q, "a", "b", "A"]])
    items = read_mc(p)
    assert items[0].question == q


def test_unreadable_csv_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"text\n\xff\xfe\n")
    with pytest.raises(MaskstoreError, match="calibration file .* is not UTF-8"):
        cal.read_samples(bad)
    with pytest.raises(MaskstoreError, match="does not exist"):
        cal.read_pair_csv(tmp_path / "missing.csv")


def test_a_csv_with_a_header_and_no_rows_says_so(tmp_path):
    """A multiple-choice or pair CSV holding its header only is said to hold no rows (it was
    "needs columns ...; found none", though the columns were there)."""
    from maskstore.compare.evaluate import read_mc

    mc = _write(tmp_path / "mc.csv", ["question", "A", "B", "matching"], [])
    with pytest.raises(MaskstoreError, match="holds no items"):
        read_mc(mc)
    pairs = _write(tmp_path / "p.csv", ["question", "matching", "not_matching"], [])
    with pytest.raises(MaskstoreError, match="holds no rows"):
        cal.read_pair_csv(pairs)
    with pytest.raises(MaskstoreError, match="needs columns question,A,B,matching; found x"):
        read_mc(_write(tmp_path / "x.csv", ["x"], [["1"]]))
