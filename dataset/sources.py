"""Built-in sources: a spec with a `generator` gets its files made (fetched, converted or generated) into the
cache before ingestion reads them. Each source is seeded or checksummed, so a folder, once made, is reused."""

from __future__ import annotations

from pathlib import Path

from dataset.spec import DatasetSpec


def materialise(spec: DatasetSpec) -> Path | None:
    """Make the files of a generated or fetched source exist; returns their folder (None: plain files)."""
    if spec.generator is None:
        return None
    folder = spec.source_dir()
    kind, params = spec.generator.kind, dict(spec.generator.params)
    if kind == "movielens-100k":
        from dataset.movielens import convert_grouplens, fetch_movielens_100k

        if params.get("grouplens_dir"):  # the original GroupLens files, converted once
            if not (folder / "ml-100k.inter").exists():
                convert_grouplens(Path(params["grouplens_dir"]), folder)
            return folder
        return fetch_movielens_100k(folder)
    if kind == "synthetic":
        from dataset.synthetic import materialise as make

        return make(params, folder)
    if kind == "shop":
        from dataset.shop import materialise as make

        return make(params, folder)
    raise ValueError(f"unknown generator {kind!r}")
