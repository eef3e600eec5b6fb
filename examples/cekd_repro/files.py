"""CUB-200-2011, Stanford Cars, FGVC-Aircraft and ImageFolder datasets in their native layouts, read from disk."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

LAYOUTS = {
    "cub": "ROOT/images/<class>/<file>.jpg, ROOT/images.txt (id path), ROOT/image_class_labels.txt (id class), "
    "ROOT/train_test_split.txt (id is_train) -- the CUB_200_2011 folder",
    "aircraft": "ROOT/data/images/<id>.jpg, ROOT/data/images_variant_trainval.txt and "
    "ROOT/data/images_variant_test.txt (id variant) -- the fgvc-aircraft-2013b folder",
    "cars": "ROOT/stanford_cars/{cars_train,cars_test}/<file>.jpg, ROOT/stanford_cars/devkit/{cars_train_annos.mat,"
    "cars_meta.mat} and ROOT/stanford_cars/cars_test_annos_withlabels.mat, as torchvision.datasets.StanfordCars reads",
    "imagefolder": "ROOT/train/<class>/<image> and ROOT/test/<class>/<image> (other files than images are ignored)",
}


class LayoutError(ValueError):
    """A dataset root is missing or does not have the expected layout."""


def _require(path: Path, dataset: str) -> Path:
    if not path.exists():
        raise LayoutError(f"{dataset}: {path} not found; expected layout: {LAYOUTS[dataset]}")
    return path


def _read_table(path: Path, dataset: str, columns: int) -> list[list[str]]:
    rows = [line.split() for line in _require(path, dataset).read_text().splitlines() if line.strip()]
    if dataset == "aircraft":  # "<id> <variant name with spaces>"
        rows = [
            [line.split(" ", 1)[0], line.split(" ", 1)[1]] for line in path.read_text().splitlines() if line.strip()
        ]
    bad = [row for row in rows if len(row) != columns]
    if bad or not rows:
        raise LayoutError(
            f"{dataset}: {path} is malformed (expected {columns} columns per line, got {bad[:1] or 'no lines'}); "
            f"expected layout: {LAYOUTS[dataset]}"
        )
    return rows


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class FileImages(Dataset):
    """Image files with integer labels; items are (RGB PIL image, label).

    A file that cannot be decoded stops the run with an ``OSError`` naming it (a dataset with broken
    files should be repaired, not silently trained on a subset).
    """

    def __init__(self, paths: list[Path], labels: list[int]) -> None:
        self.paths, self.labels = paths, labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        try:
            with Image.open(self.paths[i]) as image:
                return image.convert("RGB"), self.labels[i]
        except OSError as error:
            raise OSError(f"cannot read image {self.paths[i]}: {error}") from error


Splits = tuple[FileImages, FileImages, int]


def file_splits(dataset: str, root: str | Path) -> Splits:
    """(train, test, num_classes) of a real dataset in its native layout, without transforms."""
    root = Path(root)
    if dataset not in LAYOUTS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(LAYOUTS)} or synthetic")
    _require(root, dataset)
    readers = {"cub": _cub, "aircraft": _aircraft, "cars": _cars, "imagefolder": _imagefolder}
    return readers[dataset](root, dataset)


def _cub(root: Path, dataset: str) -> Splits:
    paths = dict(_read_table(root / "images.txt", dataset, 2))
    labels = {i: int(c) - 1 for i, c in _read_table(root / "image_class_labels.txt", dataset, 2)}
    split = {i: s == "1" for i, s in _read_table(root / "train_test_split.txt", dataset, 2)}
    parts = [[i for i in paths if split.get(i) == train] for train in (True, False)]
    made = [
        FileImages([_require(root / "images" / paths[i], dataset) for i in ids], [labels[i] for i in ids])
        for ids in parts
    ]
    return made[0], made[1], len(set(labels.values()))


def _aircraft(root: Path, dataset: str) -> Splits:
    tables = [_read_table(root / "data" / f"images_variant_{name}.txt", dataset, 2) for name in ("trainval", "test")]
    classes = sorted({variant for table in tables for _, variant in table})
    index = {name: i for i, name in enumerate(classes)}
    made = [
        FileImages(
            [_require(root / "data" / "images" / f"{i}.jpg", dataset) for i, _ in table],
            [index[v] for _, v in table],
        )
        for table in tables
    ]
    return made[0], made[1], len(classes)


def _cars(root: Path, dataset: str) -> Splits:
    import torchvision

    _require(root / "stanford_cars", dataset)
    try:
        train, test = (torchvision.datasets.StanfordCars(str(root), split=s) for s in ("train", "test"))
    except (RuntimeError, OSError, TypeError, KeyError, ValueError) as error:  # missing or malformed .mat files
        raise LayoutError(f"cars: {error or type(error).__name__}; expected layout: {LAYOUTS[dataset]}") from error
    made = [FileImages([Path(p) for p, _ in d._samples], [c for _, c in d._samples]) for d in (train, test)]
    return made[0], made[1], len(train.classes)


def _imagefolder(root: Path, dataset: str) -> Splits:
    splits = [_require(root / name, dataset) for name in ("train", "test")]
    classes = sorted(d.name for d in splits[0].iterdir() if d.is_dir())
    if not classes:
        raise LayoutError(f"imagefolder: {splits[0]} holds no class folders; expected layout: {LAYOUTS[dataset]}")
    made = []
    for folder in splits:
        items = [
            (p, i)
            for i, c in enumerate(classes)
            for p in sorted((folder / c).glob("*"))
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not items:
            raise LayoutError(
                f"imagefolder: {folder} holds no images in {classes}; expected layout: {LAYOUTS[dataset]}"
            )
        made.append(FileImages([p for p, _ in items], [c for _, c in items]))
    return made[0], made[1], len(classes)
