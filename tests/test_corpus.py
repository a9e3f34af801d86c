"""gatekv.corpus: offline real-text corpora (Info manuals, reST sources, local text files)."""

import gzip
from pathlib import Path

import pytest

from gatekv.corpus import CORPORA, load_corpus, read_text_file


def _write_info(path: Path, nodes: list[str]) -> None:
    body = "".join(f"\x1f\nFile: demo.info,  Node: N{i},  Next: N{i + 1},  Up: Top\n\n{text}\n" for i, text in
                   enumerate(nodes))
    path.write_bytes(gzip.compress((body + "\x1f\nTag Table:\nNode: Top\x7f1\n\x1f\nEnd Tag Table\n").encode()))


def test_files_and_directories(tmp_path):
    (tmp_path / "a.txt").write_text("First document.\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("Second document.")
    (tmp_path / "sub" / "empty.txt").write_text("  \n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    docs = load_corpus(str(tmp_path))
    assert [d.text for d in docs] == ["First document.", "Second document."]
    assert all(d.source == "files" for d in docs)
    assert [d.text for d in load_corpus([tmp_path / "sub" / "b.md"])] == ["Second document."]
    assert load_corpus(str(tmp_path), min_chars=16) == [docs[1]]


def test_info_markup_removed(tmp_path):
    path = tmp_path / "demo.info.gz"
    _write_info(path, ["Some prose about sed.", "More prose."])
    assert "Node:" in read_text_file(path)
    (doc,) = load_corpus([path])
    assert doc.text == "Some prose about sed.\n\nMore prose."


def test_errors_name_the_thing(tmp_path):
    with pytest.raises(ValueError, match="unknown corpus 'gnu-infoo'"):
        load_corpus("gnu-infoo")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_corpus([tmp_path / "missing.txt"])
    with pytest.raises(ValueError, match="no text files"):
        load_corpus(str(tmp_path))


def test_named_corpora_are_disjoint_roles():
    assert {c.role for c in CORPORA.values()} == {"training", "evaluation"}
    present = {name: c for name, c in CORPORA.items() if Path(c.root).is_dir()}
    if len(present) < 2:
        pytest.skip("the Debian documentation packages are not installed here")
    train = load_corpus("python-docs")
    evaluation = load_corpus("gnu-info")
    assert not {d.name for d in evaluation} & {d.name for d in train}
    # the Python manual in Info format is training text: never in the evaluation corpus
    assert not any("python" in d.name for d in evaluation)
    assert not any("Node:" in d.text[:2000] for d in evaluation)
