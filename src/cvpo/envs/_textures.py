"""Texture files that safety-gymnasium needs but the PyPI wheel lacks or makes slow.

Two problems, both solved by writing PNG files into a per-user cache directory
(never into site-packages) and pointing the MuJoCo XML that a task builds at
them with absolute paths (MuJoCo ignores ``compiler/texturedir`` for absolute
file names):

* Missing files (compat note 7): the ``Race`` tasks reference
  ``village_floor.PNG``, ``bush.PNG``, ``cliff1.PNG`` ... which the 1.0.0 wheel
  does not ship. We generate a small, deterministic, procedurally coloured noise
  texture per missing name. They only change what a *rendered* frame looks like;
  vector observations, rewards and costs do not depend on textures.
* The skybox: every navigation task loads six 3259x3259 PNGs
  (``star_hd.*.png``) on *every* ``reset()`` (each reset recompiles the world),
  which costs ~0.6 s per reset on one core, about as much as the 1000 steps of
  the episode. By default we substitute 256x256 down-sampled copies of the same
  images (made once, cached). Set ``CVPO_SAFETY_SKYBOX=original`` to keep the
  shipped HD files (only matters for rendering).

Cache location: ``$CVPO_TEXTURE_DIR`` if set, else
``$XDG_CACHE_HOME/cvpo/textures`` (default ``~/.cache/cvpo/textures``). Files
are written atomically (temp file + ``os.replace``) so parallel rollout
workers can race on the first build safely.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from pathlib import Path

import numpy as np

TEXTURE_VERSION = "v1"
SKYBOX_SIZE = 256
GENERATED_SIZE = 128

# Base colours (RGB in [0, 1]) for the textures the wheel lacks; anything
# unlisted gets grey. Purely cosmetic.
_BASE_COLORS = {
    "village_floor": (0.42, 0.55, 0.28),
    "bush": (0.20, 0.45, 0.18),
    "flower_bush": (0.30, 0.50, 0.25),
    "bamboo_wall": (0.72, 0.66, 0.40),
    "cliff1": (0.50, 0.45, 0.40),
    "cliff2": (0.48, 0.44, 0.40),
    "cliff3": (0.52, 0.47, 0.42),
    "wooden_door1": (0.50, 0.33, 0.18),
}


def texture_cache_dir() -> Path:
    """Directory holding generated textures (created on demand)."""
    override = os.environ.get("CVPO_TEXTURE_DIR")
    if override:
        root = Path(override).expanduser()
    else:
        cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(
            os.path.expanduser("~"), ".cache"
        )
        root = Path(cache_home) / "cvpo" / "textures"
    return root / TEXTURE_VERSION


def use_original_skybox() -> bool:
    return os.environ.get("CVPO_SAFETY_SKYBOX", "low").strip().lower() in {
        "original",
        "hd",
        "full",
    }


def _imageio():
    try:
        import imageio.v3 as iio
    except ImportError as exc:  # pragma: no cover - imageio is a safety-gymnasium need
        raise ImportError(
            "imageio is needed to prepare safety-gymnasium textures: pip install imageio"
        ) from exc
    return iio


def _atomic_write_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp.png", dir=path.parent)
    os.close(fd)
    try:
        _imageio().imwrite(tmp, image, extension=".png")
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these are harmless shared assets
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _procedural_texture(name: str, size: int = GENERATED_SIZE) -> np.ndarray:
    """Deterministic RGB noise around a per-name base colour (uint8, size x size x 3)."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    base = np.asarray(_BASE_COLORS.get(name, (0.5, 0.5, 0.5)), dtype=np.float64)
    # Smooth-ish noise: coarse random grid upsampled by repetition, plus fine grain.
    coarse = rng.normal(0.0, 0.08, size=(size // 16, size // 16, 1))
    coarse = np.repeat(np.repeat(coarse, 16, axis=0), 16, axis=1)
    fine = rng.normal(0.0, 0.04, size=(size, size, 1))
    image = np.clip(base[None, None, :] * (1.0 + coarse + fine), 0.0, 1.0)
    return (image * 255.0 + 0.5).astype(np.uint8)


def generated_texture_path(stem: str) -> str:
    """Absolute path of a generated stand-in for a missing texture ``stem``.

    ``stem`` is the file name without extension (``village_floor``).
    """
    path = texture_cache_dir() / "generated" / f"{stem}.png"
    if not path.exists():
        _atomic_write_png(path, _procedural_texture(stem))
    return str(path)


def downsampled_texture_path(source: str, size: int = SKYBOX_SIZE) -> str:
    """Absolute path of a ``size``-pixel down-sampled copy of the image ``source``.

    Falls back to ``source`` itself when it cannot be read (the original
    behaviour), so this can only make things faster, never break them.
    """
    src = Path(source)
    try:
        stat = src.stat()
    except OSError:
        return source
    # Key by name, size and mtime so an upgraded wheel invalidates the copy.
    key = f"{src.stem}.{stat.st_size}.{int(stat.st_mtime)}.{size}"
    path = texture_cache_dir() / "skybox" / f"{key}.png"
    if not path.exists():
        try:
            image = np.asarray(_imageio().imread(src))
        except Exception:  # noqa: BLE001 - unreadable image: keep the original file
            return source
        h, w = image.shape[:2]
        kh, kw = h // size, w // size
        if kh < 2 or kw < 2:
            return source
        # Box filter: average kh x kw blocks (crop the remainder rows/columns).
        block = image[: size * kh, : size * kw].astype(np.float32)
        block = block.reshape(size, kh, size, kw, *image.shape[2:]).mean(axis=(1, 3))
        _atomic_write_png(path, np.clip(block + 0.5, 0, 255).astype(np.uint8))
    return str(path)
