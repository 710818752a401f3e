"""Several new local results stores created at once: a stratified run's groups.

:func:`~flashmm_dask.io.results.create_results` writes 26 arrays' metadata, five
coordinates and the consolidated metadata of a store: 55 ms alone, three times that in a
task on a busy Dask worker, and a stratified run creates one store per stratum (29 cell
states: 4-6 s of the workers' time). The strata's stores differ only in their root
attributes when their layouts are equal (the same features, coefficients, components,
contrasts and block size, as they are for every stratum of most designs). Here the
arrays of each distinct layout are created once, in a hidden template folder without
attributes, and each store is a copy of its template's folder, staged into place after
its attributes are written: the files of ``create_results(path, layout, attrs)``, byte
for byte, in a few milliseconds each.

Each copy's root document (``zarr.json``, with the consolidated metadata of its 31
arrays) gets its attributes spliced in (:class:`_Template`), not read and rewritten by
Zarr: that took 40-100 ms a store on a busy driver, before the fit's first tasks (29
strata: 1-3 s).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import zarr

from flashmm_dask.errors import StoreError
from flashmm_dask.io.results import full_attrs
from flashmm_dask.io.results_attrs import _default_versions
from flashmm_dask.io.results_layout import ResultsLayout
from flashmm_dask.io.writing import staged
from flashmm_dask.io.zarr_batch import create_arrays

__all__ = ["create_many"]

logger = logging.getLogger(__name__)


def create_many(
    stores: Sequence[tuple[str | os.PathLike[str], ResultsLayout, Mapping[str, Any]]],
    *,
    threads: int = 4,
) -> None:
    """``create_results(path, layout, attrs)`` for each new local store of ``stores``.

    The stores of one layout are copies of one template (see the module docstring),
    made in ``threads`` threads.

    Raises
    ------
    StoreError
        Something is at one of the paths (nothing is replaced here), or a store cannot
        be written (those created before stay).
    """
    if not stores:
        return
    for path, _, _ in stores:
        if os.path.lexists(path):
            raise StoreError(
                f"{os.fspath(path)!r} already exists; choose another output path, or "
                "overwrite it (--overwrite) to replace it"
            )
    versions = _default_versions()  # read once (package metadata)
    full = [full_attrs(layout, attrs, versions) for _, layout, attrs in stores]
    first = Path(stores[0][0])
    first.parent.mkdir(parents=True, exist_ok=True)
    templates: dict[ResultsLayout, Path] = {}
    try:
        for _, layout, _ in stores:
            if layout not in templates:
                folder = first.parent / f".{first.name}.template-{uuid.uuid4().hex[:12]}"
                create_arrays(
                    zarr.open_group(store=str(folder), mode="w-", zarr_format=3), layout, None
                )
                templates[layout] = folder

        files = {layout: _Template(folder) for layout, folder in templates.items()}

        def copy(index: int) -> None:
            path, layout, _ = stores[index]
            with staged(Path(path), overwrite=False) as tmp:
                files[layout].write(tmp, full[index])

        with ThreadPoolExecutor(max(1, min(threads, len(stores)))) as pool:
            list(pool.map(copy, range(len(stores))))
    except OSError as exc:
        raise StoreError(
            f"cannot create the results stores under {str(first.parent)!r}: {exc}"
        ) from exc
    finally:
        for folder in templates.values():
            shutil.rmtree(folder, ignore_errors=True)
    logger.info(
        "created %d results stores (%d layouts) under %s", len(stores), len(templates), first.parent
    )


class _Template:
    """A template store's files, held in memory, and its copies with their attributes.

    The files are read once (a few dozen small ones: the arrays' metadata and the
    coordinates) and written into each copy. The root document (``zarr.json``) is written
    last, with the copy's attributes spliced in as Zarr serialises them: Zarr writes a
    group's metadata as ``json.dumps(metadata, indent=json_indent, allow_nan=True)``, the
    attributes first; the document is serialised once with a marker in place of the
    attributes, and each copy's attributes alone put in the marker's place, their lines
    indented one level deeper (the encoder writes a nested object as it writes a
    top-level one, each new line indented once more per level; strings hold no raw new
    line). Where the template's document is not of that form (another Zarr), each copy's
    attributes are written by Zarr itself.
    """

    def __init__(self, folder: Path) -> None:
        self.folders: list[str] = []
        self.files: dict[str, bytes] = {}
        for top, dirs, names in os.walk(folder):
            relative = os.path.relpath(top, folder)
            self.folders += sorted(os.path.join(relative, d) for d in dirs)
            for name in names:
                self.files[os.path.join(relative, name)] = Path(top, name).read_bytes()
        self.root = self.files.pop(os.path.join(".", "zarr.json"))
        indent = zarr.config.get("json_indent")
        self.indent = " " * indent if isinstance(indent, int) else indent
        text = self.root.decode("utf-8")
        doc = json.loads(text)
        marker = json.dumps(f"flashmm-attributes-{uuid.uuid4().hex}")
        self.text: str | None = None  # the marked document, where the splice applies
        self.marker = marker
        if doc.get("attributes") == {}:
            marked = json.dumps(
                {**doc, "attributes": json.loads(marker)}, indent=indent, allow_nan=True
            )
            if marked.count(marker) == 1 and marked.replace(marker, "{}") == text:
                self.text = marked

    def write(self, folder: Path, attrs: Mapping[str, Any]) -> None:
        """Write a copy of the template into the new ``folder`` with the attributes
        ``attrs``, the root document last."""
        folder.mkdir()
        for name in self.folders:
            (folder / name).mkdir()
        for name, data in self.files.items():
            (folder / name).write_bytes(data)
        if self.text is None:
            (folder / "zarr.json").write_bytes(self.root)
            zarr.open_group(store=str(folder), mode="r+").update_attributes(dict(attrs))
            return
        value = json.dumps(dict(attrs), indent=self.indent, allow_nan=True)
        if self.indent is not None:
            value = value.replace("\n", "\n" + self.indent)
        text = self.text.replace(self.marker, value, 1)
        (folder / "zarr.json").write_bytes(text.encode("utf-8"))
