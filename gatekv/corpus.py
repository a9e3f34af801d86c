"""Real human-written documents, read offline from what Debian packages install.

Two named corpora, kept apart on purpose (different documents *and* different sources)::

    docs = load_corpus("python-docs")     # training: the Python 3.11 documentation sources (reStructuredText)
    docs = load_corpus("gnu-info")        # evaluation: the GNU manuals in Info format
    docs = load_corpus(["notes.txt", "manuals/"])   # any local text files (a directory: every text file in it)

- ``python-docs`` (role: training): ``/usr/share/doc/python3.11/html/_sources/**/*.rst.txt`` of Debian's
  ``python3.11-doc`` (``apt-get install python3.11-doc``): tutorial, HOWTOs, library and language reference, FAQ,
  what's new. One document per source file. (``gatekv.training.synthetic``'s haystack, ``pydoc_data.topics``, is
  derived from the same documentation, so training stays on one side of the split.)
- ``gnu-info`` (role: evaluation): the GNU manuals in ``/usr/share/info`` (coreutils, sed, grep, gettext, wget,
  diffutils, find, gnupg, bash, the GNU coding standards, ...; ``apt-get install bash-doc gnu-standards`` adds the
  last two). One document per manual (multi-part ``.info-N.gz`` files joined in order); Info navigation lines and
  node separators are removed. The Python manual in Info format is excluded: it is the training corpus.

Documents are returned sorted by name, so a seed picks the same windows on every machine with the same packages.
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CORPORA", "Corpus", "Document", "load_corpus", "read_text_file"]


@dataclass(frozen=True)
class Document:
    """One real document."""

    name: str
    """Stable identifier, e.g. ``gnu-info:sed`` or ``python-docs:library/os.rst.txt``."""
    source: str
    """The corpus it came from (``python-docs``, ``gnu-info`` or ``files``)."""
    text: str


@dataclass(frozen=True)
class Corpus:
    """A named offline corpus."""

    name: str
    role: str
    """``training`` or ``evaluation``: which side of the train/eval split the corpus belongs to."""
    root: str
    """Where its files live."""
    install: str
    """How to get the files on Debian/Ubuntu."""


CORPORA: dict[str, Corpus] = {
    "python-docs": Corpus("python-docs", "training", "/usr/share/doc/python3.11/html/_sources",
                          "apt-get install python3.11-doc"),
    "gnu-info": Corpus("gnu-info", "evaluation", "/usr/share/info",
                       "present on a base Debian system; apt-get install bash-doc gnu-standards adds two manuals"),
}
"""Named corpora; training recipes use ``training`` ones, evaluation configs ``evaluation`` ones."""

_TEXT_SUFFIXES = (".txt", ".rst", ".md", ".text", ".info", ".gz")
_INFO_PART = re.compile(r"^(?P<stem>.+?)\.info(?:-(?P<part>\d+))?\.gz$")
_INFO_HEADER = re.compile(r"^File: [^,]+,\s+Node: .*$", re.MULTILINE)
_INFO_EXCLUDED = ("python", "dir")
"""Info manuals that are not evaluation text: the Python manual (training corpus) and the directory node."""


def read_text_file(path: str | Path) -> str:
    """The text of a (possibly gzip-compressed) UTF-8 file; undecodable bytes are replaced."""
    path = Path(path)
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", errors="replace")


def _clean_info(text: str) -> str:
    """Info text without node separators, navigation headers, tag tables and menu markers."""
    text = text.split("\x1f\nTag Table:", 1)[0]
    text = text.replace("\x1f", "").replace("\x00\x08[index\x00\x08]", "").replace("\x7f", "")
    text = _INFO_HEADER.sub("", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _gnu_info(root: Path) -> list[Document]:
    parts: dict[str, list[tuple[int, Path]]] = {}
    for path in root.glob("*.info*.gz"):
        match = _INFO_PART.match(path.name)
        if match is None:
            continue
        stem = match["stem"]
        if any(stem.startswith(prefix) for prefix in _INFO_EXCLUDED):
            continue
        parts.setdefault(stem, []).append((int(match["part"] or 0), path))
    documents = []
    for stem in sorted(parts):
        text = "\n\n".join(_clean_info(read_text_file(p)) for _, p in sorted(parts[stem]))
        # a multi-part manual's main file holds only the indirect table; the text is in its parts
        text = re.sub(r"^Indirect:\n(?:.*: \d+\n)+", "", text, flags=re.MULTILINE).strip()
        if text:
            documents.append(Document(f"gnu-info:{stem}", "gnu-info", text))
    return documents


def _python_docs(root: Path) -> list[Document]:
    documents = []
    for path in sorted(root.rglob("*.rst.txt")):
        text = read_text_file(path).strip()
        if text:
            documents.append(Document(f"python-docs:{path.relative_to(root).as_posix()}", "python-docs", text))
    return documents


def _files(paths: list[Path]) -> list[Document]:
    documents = []
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"corpus file {str(path)!r} does not exist")
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(_TEXT_SUFFIXES)) \
            if path.is_dir() else [path]
        for file in files:
            text = read_text_file(file)
            if file.name.endswith(".info.gz") or file.suffix == ".info":
                text = _clean_info(text)
            if text.strip():
                documents.append(Document(f"files:{file.as_posix()}", "files", text.strip()))
    return documents


def load_corpus(spec: str | Path | list[str | Path], min_chars: int = 0) -> list[Document]:
    """Documents of a named corpus (:data:`CORPORA`) or of local text files.

    ``spec``: a corpus name, a file or directory path, or a list of paths. ``min_chars`` drops shorter documents.
    Raises ``ValueError`` naming the corpus when it is unknown or has no documents here (with how to install it).
    """
    if isinstance(spec, str) and spec in CORPORA:
        corpus = CORPORA[spec]
        root = Path(corpus.root)
        documents = _gnu_info(root) if spec == "gnu-info" else _python_docs(root)
        if not documents:
            raise ValueError(f"corpus {spec!r}: no documents under {corpus.root} ({corpus.install})")
    else:
        if isinstance(spec, str) and not Path(spec).exists() and "/" not in spec and "." not in spec:
            raise ValueError(f"unknown corpus {spec!r}: use one of {sorted(CORPORA)} or paths to text files")
        paths = [Path(p) for p in (spec if isinstance(spec, list) else [spec])]
        documents = _files(paths)
        if not documents:
            raise ValueError(f"corpus {[str(p) for p in paths]}: no text files with content")
    return [d for d in documents if len(d.text) >= min_chars]
