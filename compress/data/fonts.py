"""Fonts for the demo data, taken from installed Python packages rather than from the machine's font folders.

The generator draws with the faces in ``PACKAGED_FACES``: Latin sans, serif and mono designs in several weights
and slants (DejaVu and STIX from matplotlib, Noto Sans / Noto Serif from ``fontpkg-noto-*``) and three Chinese
designs (Noto Sans SC and Noto Serif SC from ``pylopdf-fonts-zh-cn``, WenQuanYi Micro Hei from
``paperang-p2-fonts-cjk``), all under free licences (OFL, Bitstream Vera / public domain, Apache-2.0). The packages
are pinned in ``constraints.txt``, so every machine draws the same glyphs. A face "renders" a character when it
maps it to a glyph with ink that is not its missing-glyph box.
"""
from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from PIL import ImageFont

from compress.errors import InputError

INSTALL_HINT = "pip install -c constraints.txt -e ."
_FONT_SUFFIXES = (".ttf", ".ttc", ".otf")
_MISSING_GLYPH = chr(0x10FFFD)  # a private-use code point no text font maps: renders as the "missing" box
_CHECK_SIZE = 24  # px size at which glyphs are compared with the missing-glyph box


@dataclass(frozen=True)
class PackagedFace:
    """One face of a font file that a Python package installs.

    ``file`` is the path inside site-packages as the package's RECORD lists it; ``axes`` are a variable font's axis
    values in the font's own axis order (Noto: weight, width), None for static fonts.
    """

    package: str
    file: str
    family: str
    style: str
    index: int = 0
    axes: tuple[float, ...] | None = None


_MPL = "matplotlib/mpl-data/fonts/ttf/"
_NOTO_SANS = "fontpkg_noto_sans/files/"
_NOTO_SERIF = "fontpkg_noto_serif/files/"
PACKAGED_FACES: tuple[PackagedFace, ...] = (
    PackagedFace("matplotlib", _MPL + "DejaVuSans.ttf", "DejaVu Sans", "Book"),
    PackagedFace("matplotlib", _MPL + "DejaVuSans-Bold.ttf", "DejaVu Sans", "Bold"),
    PackagedFace("matplotlib", _MPL + "DejaVuSans-Oblique.ttf", "DejaVu Sans", "Oblique"),
    PackagedFace("matplotlib", _MPL + "DejaVuSans-BoldOblique.ttf", "DejaVu Sans", "Bold Oblique"),
    PackagedFace("matplotlib", _MPL + "DejaVuSerif.ttf", "DejaVu Serif", "Book"),
    PackagedFace("matplotlib", _MPL + "DejaVuSerif-Bold.ttf", "DejaVu Serif", "Bold"),
    PackagedFace("matplotlib", _MPL + "DejaVuSerif-Italic.ttf", "DejaVu Serif", "Italic"),
    PackagedFace("matplotlib", _MPL + "DejaVuSansMono.ttf", "DejaVu Sans Mono", "Book"),
    PackagedFace("matplotlib", _MPL + "DejaVuSansMono-Bold.ttf", "DejaVu Sans Mono", "Bold"),
    PackagedFace("matplotlib", _MPL + "STIXGeneral.ttf", "STIX General", "Regular"),
    PackagedFace("matplotlib", _MPL + "STIXGeneralBol.ttf", "STIX General", "Bold"),
    PackagedFace("matplotlib", _MPL + "STIXGeneralItalic.ttf", "STIX General", "Italic"),
    PackagedFace("fontpkg-noto-sans", _NOTO_SANS + "NotoSans[wdth,wght].ttf", "Noto Sans", "Regular", axes=(400, 100)),
    PackagedFace("fontpkg-noto-sans", _NOTO_SANS + "NotoSans[wdth,wght].ttf", "Noto Sans", "Bold", axes=(700, 100)),
    PackagedFace("fontpkg-noto-sans", _NOTO_SANS + "NotoSans[wdth,wght].ttf", "Noto Sans", "Condensed",
                 axes=(400, 75)),
    PackagedFace("fontpkg-noto-sans", _NOTO_SANS + "NotoSans-Italic[wdth,wght].ttf", "Noto Sans", "Italic",
                 axes=(400, 100)),
    PackagedFace("fontpkg-noto-serif", _NOTO_SERIF + "NotoSerif[wdth,wght].ttf", "Noto Serif", "Regular",
                 axes=(400, 100)),
    PackagedFace("fontpkg-noto-serif", _NOTO_SERIF + "NotoSerif[wdth,wght].ttf", "Noto Serif", "Bold",
                 axes=(700, 100)),
    PackagedFace("fontpkg-noto-serif", _NOTO_SERIF + "NotoSerif-Italic[wdth,wght].ttf", "Noto Serif", "Italic",
                 axes=(400, 100)),
    PackagedFace("pylopdf-fonts-zh-cn", "pylopdf_fonts_zh_cn/NotoSansSC-Regular.otf", "Noto Sans SC", "Regular"),
    PackagedFace("pylopdf-fonts-zh-cn", "pylopdf_fonts_zh_cn/NotoSerifSC-Regular.otf", "Noto Serif SC", "Regular"),
    PackagedFace("paperang-p2-fonts-cjk", "paperang_p2_fonts_cjk/fonts/wqy-microhei.ttc", "WenQuanYi Micro Hei",
                 "Regular", index=0),
    PackagedFace("paperang-p2-fonts-cjk", "paperang_p2_fonts_cjk/fonts/wqy-microhei.ttc", "WenQuanYi Micro Hei",
                 "Mono", index=1),
)


@dataclass(frozen=True)
class FontFace:
    """A face the generator draws with: file, index in a collection, variable-font axes and display name."""

    name: str  # "Noto Serif SC Regular"; recorded in the manifest
    family: str  # faces of one family share a design and differ in weight, slant or width
    path: Path
    index: int = 0
    axes: tuple[float, ...] | None = None

    def load(self, size: int) -> ImageFont.FreeTypeFont:
        """The face at ``size`` px (cached)."""
        return _load_font(self.path, self.index, self.axes, size)


@dataclass(frozen=True)
class FontSet:
    """The faces to draw with and, for each character of interest, which faces render it."""

    faces: tuple[FontFace, ...]
    masks: Mapping[str, int]  # char -> bit i set when faces[i] renders it
    packages: Mapping[str, str]  # package -> installed version of the packages the faces come from

    @property
    def names(self) -> list[str]:
        """Face names, as recorded in the manifest."""
        return [face.name for face in self.faces]

    def renderable(self, chars: Iterable[str]) -> list[str]:
        """The characters of ``chars`` that at least one face renders, sorted."""
        return sorted({char for char in chars if self.masks.get(char, 0)})

    def faces_for(self, text: str) -> list[FontFace]:
        """Faces that render every character of ``text`` (spaces need no glyph)."""
        mask = (1 << len(self.faces)) - 1
        for char in set(text) - {" "}:
            mask &= self.masks.get(char, 0)
            if not mask:
                return []
        return [face for bit, face in enumerate(self.faces) if mask >> bit & 1]


def packaged_font_files() -> list[tuple[PackagedFace, Path, str]]:
    """Locate every face of ``PACKAGED_FACES`` inside its installed package.

    Returns:
        (face, absolute font path, package version) per face, in table order.

    Raises:
        InputError: A font package is not installed or lacks the font file (one line naming the package and the fix).
    """
    located = []
    for face in PACKAGED_FACES:
        path, version = _package_file(face.package, face.file)
        located.append((face, path, version))
    return located


def _package_file(package: str, file: str) -> tuple[Path, str]:
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(f"font package {package} is not installed (the demo data is drawn with its fonts); "
                         f"install the pinned requirements: {INSTALL_HINT}") from None
    path = Path(dist.locate_file(file))
    if not path.is_file():
        raise InputError(f"{path}: font file missing from package {package} {dist.version}; "
                         f"reinstall the pinned requirements: {INSTALL_HINT}")
    return path, dist.version


def load_font_set(chars: Iterable[str], extra_font_dirs: Sequence[str | Path] = ()) -> FontSet:
    """The packaged faces (plus any fonts under ``extra_font_dirs``) and which of ``chars`` each renders.

    Args:
        chars: Characters whose coverage is needed (the generator's vocabulary, the dictionary).
        extra_font_dirs: Folders searched recursively for more ``.ttf``/``.otf``/``.ttc`` files; each face found
            that loads becomes its own family. Sorted by path, so the result does not depend on directory order.

    Returns:
        The font set; faces that render none of ``chars`` are dropped.

    Raises:
        InputError: A font package or file is missing, or an extra font folder does not exist.
    """
    wanted = "".join(sorted(set(chars) - {" "}))
    faces, packages = [], {}
    for spec, path, version in packaged_font_files():
        faces.append(FontFace(name=f"{spec.family} {spec.style}", family=spec.family, path=path, index=spec.index,
                              axes=spec.axes))
        packages[spec.package] = version
    faces += _extra_faces(extra_font_dirs)
    coverage = [(face, _rendered_chars(face.path, face.index, wanted)) for face in faces]
    coverage = [(face, rendered) for face, rendered in coverage if rendered]
    masks: dict[str, int] = {}
    for bit, (_, rendered) in enumerate(coverage):
        for char in rendered:
            masks[char] = masks.get(char, 0) | 1 << bit
    return FontSet(faces=tuple(face for face, _ in coverage), masks=masks, packages=packages)


def _extra_faces(font_dirs: Sequence[str | Path]) -> list[FontFace]:
    faces = []
    for folder in map(Path, font_dirs):
        if not folder.is_dir():
            raise InputError(f"{folder}: font folder not found (--font-dir)")
        for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in _FONT_SUFFIXES):
            try:
                font = ImageFont.truetype(str(path), _CHECK_SIZE, layout_engine=ImageFont.Layout.BASIC)
            except OSError:
                continue  # not a font PIL can read
            family, style = font.getname()
            faces.append(FontFace(name=f"{family} {style}", family=f"{family} ({path.name})", path=path))
    return faces


@lru_cache(maxsize=None)
def _rendered_chars(path: Path, index: int, chars: str) -> frozenset[str]:
    """Characters of ``chars`` the face draws with a real glyph (cached: tests build many data sets)."""
    font = ImageFont.truetype(str(path), _CHECK_SIZE, index=index, layout_engine=ImageFont.Layout.BASIC)
    missing = _glyph_signature(font, _MISSING_GLYPH)
    rendered = set()
    for char in chars:
        mask = font.getmask(char)
        if mask.getbbox() is not None and (mask.size, bytes(mask)) != missing:
            rendered.add(char)
    return frozenset(rendered)


def _glyph_signature(font: ImageFont.FreeTypeFont, char: str) -> tuple:
    mask = font.getmask(char)
    return mask.size, bytes(mask)


@lru_cache(maxsize=4096)
def _load_font(path: Path, index: int, axes: tuple[float, ...] | None, size: int) -> ImageFont.FreeTypeFont:
    # BASIC layout: raqm (when installed) may shape differently and break reproducibility across machines.
    font = ImageFont.truetype(str(path), size, index=index, layout_engine=ImageFont.Layout.BASIC)
    if axes is not None:
        font.set_variation_by_axes(list(axes))
    return font
