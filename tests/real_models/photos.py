"""Real photographs for the real-model checks and benchmarks: scikit-image's sample images.

scikit-image's wheel ships its sample photos (`skimage/data/*.png|jpg`, CC0 / public domain, see
its data README); they are read from the installed package's folder with Pillow, without
importing scikit-image (its dependencies are not needed). Installed with
`pip install --no-deps -r tests/real_models/requirements.txt`.
"""
from __future__ import annotations

import importlib.machinery
from pathlib import Path

REQUIREMENTS = ("scikit-image==0.26.0", "pillow==13.0.0")  # pinned in tests/real_models/requirements.txt
MEAN = (0.485, 0.456, 0.406)  # ImageNet normalisation (torchvision's MobileNetV2 weights expect it)
STD = (0.229, 0.224, 0.225)


def folder() -> Path | None:
    spec = importlib.machinery.PathFinder.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "data"
    return d if d.is_dir() else None


def skip_reason() -> str | None:
    try:
        import PIL  # noqa: F401
    except ImportError:
        return "Pillow is not installed (pip install --no-deps -r tests/real_models/requirements.txt)"
    return None if folder() else "scikit-image's sample photos are not installed (tests/real_models/requirements.txt)"


def files() -> list[Path]:
    d = folder()
    return sorted(p for p in d.iterdir() if p.suffix in (".png", ".jpg")) if d else []


def photos(n: int = 24, size: int = 224):
    """Up to n photos as an (n, 3, size, size) ImageNet-normalised float tensor: the shorter side
    resized to size * 8/7, centre-cropped (torchvision's evaluation transform); grey images as RGB.
    With fewer files than n, each photo is also used mirrored."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    images = []
    for p in files():
        with Image.open(p) as im:
            im = im.convert("RGB")
            short = round(size * 8 / 7)
            w, h = im.size
            im = im.resize((max(short, round(w * short / h)), max(short, round(h * short / w))), Image.BILINEAR)
            im = ImageOps.fit(im, (size, size))
            images.append(im)
    images += [ImageOps.mirror(im) for im in images]
    arr = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images[:n]])
    x = (arr - np.array(MEAN, dtype=np.float32)) / np.array(STD, dtype=np.float32)
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
