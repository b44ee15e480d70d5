"""Reading labelled texts (transfer_lit.data.text_files): columns found by name, index or content; one clear
error per kind of bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import SHARED

from transfer_lit.data.text_files import TableFormat, check_texts, read_table, read_text_folders

TEXT_DATA = SHARED / "data"
needs_text_data = pytest.mark.skipif(not (TEXT_DATA / "sst2").is_dir(), reason=f"{TEXT_DATA} absent (no ../shared)")


def _table(tmp_path: Path, content: str, name: str = "data.tsv", **fmt: object) -> list[tuple[str, str, int]]:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return read_table(path, "data.train_csv", TableFormat(**fmt))  # type: ignore[arg-type]


def test_a_header_is_detected_by_its_column_names(tmp_path: Path) -> None:
    rows = _table(tmp_path, "sentence\tlabel\na fine film\t1\nawful\t0\n")
    assert rows == [("a fine film", "1", 2), ("awful", "0", 3)]


def test_without_a_header_the_longest_column_is_the_text(tmp_path: Path) -> None:
    rows = _table(tmp_path, "Sports\tthe match ended in a draw\nWorld\tleaders met in Geneva today\n")
    assert rows[0] == ("the match ended in a draw", "Sports", 1)


def test_columns_by_name_or_index_and_tsv_quotes_are_kept(tmp_path: Path) -> None:
    content = 'id\tlabel\treview\n1\tpos\tsaid "great" twice\n'
    assert _table(tmp_path, content, text_column="review")[0][0] == 'said "great" twice'
    assert _table(tmp_path, content, text_column=2, label_column=1, header=True)[0][:2] == ('said "great" twice', "pos")


def test_csv_quoting_and_a_byte_order_mark(tmp_path: Path) -> None:
    rows = _table(tmp_path, '\ufefftext,label\n"one, two",a\n', name="data.csv")
    assert rows == [("one, two", "a", 2)]


def test_a_misnamed_column_lists_the_columns_and_the_closest(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data.text_column='sentense'.*columns are \['sentence', 'label'\].*"
                                         r"Did you mean 'sentence'"):
        _table(tmp_path, "sentence\tlabel\nfine\t1\n", text_column="sentense")


def test_an_index_out_of_range_and_a_name_without_header(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data.label_column=5 .* 2 column\(s\)"):
        _table(tmp_path, "fine film\t1\n", label_column=5)
    with pytest.raises(ValueError, match=r"names a column but .* has no header row"):
        _table(tmp_path, "fine film\t1\n", header=False, text_column="text")


def test_a_short_row_names_its_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"line 3 has 1 column\(s\), not 2"):
        _table(tmp_path, "text\tlabel\nfine\t1\nbroken row\n")


def test_a_tab_file_named_csv_gets_a_hint(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"needs the \.tsv extension or data\.delimiter"):
        _table(tmp_path, "text,label\nfine\t1\n", name="data.csv")


def test_non_utf8_bytes_name_the_line_and_the_encoding_option(tmp_path: Path) -> None:
    path = tmp_path / "latin.tsv"
    path.write_bytes("text\tlabel\nok\t1\ncaf\xe9 cr\xe8me\t0\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"line 3 is not valid utf-8 \(byte b'\\xe9'.*data.encoding"):
        read_table(path, "data.train_csv", TableFormat())
    rows = read_table(path, "data.train_csv", TableFormat(encoding="latin-1"))
    assert rows[1][0] == "café crème"


def test_empty_and_whitespace_texts_are_refused_or_skipped() -> None:
    rows = [("fine", "1", "f:2"), ("   ", "0", "f:3"), ("ok", "", "f:4"), ("good", "1", "f:5")]
    with pytest.raises(ValueError, match=r"2 train row\(s\) .* f:3 \(empty text\), f:4 \(empty label\).*"
                                         r"bad_texts=skip"):
        check_texts(rows, "error", "train")
    assert check_texts(rows, "skip", "train") == [rows[0], rows[3]]


def test_a_folder_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="is a folder; it takes a CSV / TSV file"):
        read_table(tmp_path, "data.train_csv", TableFormat())
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_table(tmp_path / "missing.tsv", "data.train_csv", TableFormat())


def test_class_folders_of_txt_files(tmp_path: Path) -> None:
    for label, texts in {"neg": ["bad", "awful"], "pos": ["good"]}.items():
        (tmp_path / label).mkdir()
        for i, text in enumerate(texts):
            (tmp_path / label / f"{i}.txt").write_text(text)
    (tmp_path / "pos" / ".hidden.txt").write_text("ignored")
    found = read_text_folders(tmp_path, "data.root", "utf-8")
    assert {c: [t for t, _ in v] for c, v in found.items()} == {"neg": ["bad", "awful"], "pos": ["good"]}


@needs_text_data
@pytest.mark.parametrize("file", ["sst2/train.tsv", "agnews/test.tsv", "sms_spam/SMSSpamCollection"])
def test_the_three_shared_corpora_load_with_no_options(file: str) -> None:
    rows = read_table(TEXT_DATA / file, "data.train_csv", TableFormat())
    labels = {label for _, label, _ in rows}
    if file.startswith("sst2"):
        assert labels == {"0", "1"} and len(rows) == 60614
    elif file.startswith("agnews"):
        assert labels == {"Business", "Sci/Tech", "Sports", "World"} and len(rows) == 7600
    else:
        assert labels == {"ham", "spam"} and len(rows) == 5574
        assert sum(label == "spam" for _, label, _ in rows) == 747
    assert sum(len(text) > len(label) for text, label, _ in rows[:100]) >= 95  # the text column, not the label
