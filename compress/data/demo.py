"""Deterministic synthetic OCR data in PaddleOCR's label formats, for demos and tests.

``generate_demo_data`` renders document-like pages (detection) and cropped text lines
(recognition) with the fonts found on the machine, degrades them (rotation, blur, noise,
JPEG, textured backgrounds) and writes PaddleOCR ``SimpleDataSet`` label files. The same seed,
counts and fonts give byte-identical label files and identical images, because every image
draws its randomness from its own seed derived from (seed, task, split, index).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from compress.errors import ConfigError, InputError

# Bump when the generator's output changes, so an existing data set is not mistaken for a new one.
GENERATOR_VERSION = 1
SPLITS = ("train", "eval", "calib")
TASKS = ("det", "rec")
DEFAULT_FONT_DIRS = (
    Path("/usr/share/fonts"),
    Path("/usr/local/share/fonts"),
    Path.home() / ".fonts",
    Path.home() / ".local/share/fonts",
)
MAX_TEXT_LEN = 25  # PP-OCR rec configs use max_text_length: 25; longer labels are dropped in training.
IGNORE_TRANSCRIPTION = "###"

_LATIN_FONT_PREFIXES = ("DejaVuSans", "DejaVuSerif", "LiberationSans", "LiberationSerif", "LiberationMono")
_CJK_FONT_MARKERS = ("wqy", "notosanscjk", "notoserifcjk", "droidsansfallback", "sourcehan", "uming", "ukai")
_FONT_SUFFIXES = (".ttf", ".ttc", ".otf")
_MISSING_GLYPH = chr(0x10FFFD)  # a private-use code point no text font maps: renders as the "missing" box


@dataclass(frozen=True)
class DemoCounts:
    """How many images to write per task and split."""

    det_train: int = 60
    det_eval: int = 30
    det_calib: int = 16
    rec_train: int = 600
    rec_eval: int = 300
    rec_calib: int = 64

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"DemoCounts.{field.name}={value!r}: must be a whole number >= 0")

    def of(self, task: str, split: str) -> int:
        """Number of images for ``task`` ("det"/"rec") and ``split`` ("train"/"eval"/"calib")."""
        return getattr(self, f"{task}_{split}")


@dataclass(frozen=True)
class FontSpec:
    """A font file (and face index inside a collection) that can render the text it is used for."""

    path: Path
    index: int
    name: str


@dataclass(frozen=True)
class DemoFonts:
    """Fonts used for generation: several Latin faces and an optional CJK-capable one."""

    latin: tuple[FontSpec, ...]
    cjk: FontSpec | None

    @property
    def names(self) -> list[str]:
        """Font names (family and style), as recorded in the manifest."""
        return [font.name for font in self.latin] + ([self.cjk.name] if self.cjk else [])


def generate_demo_data(
    out_dir: str | Path,
    seed: int = 0,
    counts: DemoCounts = DemoCounts(),
    show_progress: bool = True,
    *,
    force: bool = False,
    font_dirs: Sequence[str | Path] | None = None,
) -> dict:
    """Write the demo OCR data set to ``out_dir`` (atomically), or reuse an identical one.

    Layout: ``det/{train,eval,calib}/*.jpg`` with ``det/{split}.txt`` (paths relative to ``out_dir/det``),
    ``rec/{train,eval,calib}/*.jpg`` with ``rec/{split}.txt`` (relative to ``out_dir/rec``),
    ``README.txt`` and ``manifest.json`` (seed, counts, fonts, sha256 of each label file).

    Args:
        out_dir: Destination folder; it is replaced as a whole, never half-written.
        seed: Base random seed; each split uses its own seeds, so splits never share images.
        counts: Images per task and split.
        show_progress: Show a tqdm progress bar.
        force: Regenerate even if ``out_dir`` already holds a data set (the old one is removed).
        font_dirs: Folders searched (recursively) for fonts; defaults to the usual system font folders.

    Returns:
        A dict with ``out_dir``, ``seed``, ``counts``, ``fonts``, ``label_files`` (``"det_train"`` ->
        absolute path, ...) and ``generated`` (False when an identical data set was reused).

    Raises:
        ConfigError: ``seed`` is not a whole number >= 0.
        InputError: ``out_dir`` holds other data and ``force`` is False, its label files were
            changed since generation, or no usable font was found.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed={seed!r}: must be a whole number >= 0")
    out = Path(out_dir)
    existing = _read_manifest(out)
    if not force and existing is not None and _manifest_matches(existing, seed, counts):
        _check_label_hashes(out, existing)
        return _summary(out, existing, generated=False)
    if not force and out.exists() and any(out.iterdir()):
        raise InputError(f"{out}: already holds other data (not this seed/counts/generator version); "
                         "pass --force to replace it, or choose another --out")
    fonts = find_fonts(font_dirs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        manifest = _write_dataset(tmp, seed, counts, fonts, show_progress)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _summary(out, manifest, generated=True)


# --------------------------------------------------------------------------- fonts


def find_fonts(font_dirs: Sequence[str | Path] | None = None) -> DemoFonts:
    """Find Latin fonts (DejaVu/Liberation families) and one CJK-capable font, if any.

    Args:
        font_dirs: Folders searched recursively; defaults to the usual system font folders.

    Returns:
        The fonts, sorted by file name so generation does not depend on directory order.

    Raises:
        InputError: No Latin font that renders the demo texts was found.
    """
    dirs = [Path(d) for d in (font_dirs if font_dirs is not None else DEFAULT_FONT_DIRS)]
    files = sorted({p for d in dirs if d.is_dir() for p in d.rglob("*") if p.suffix.lower() in _FONT_SUFFIXES},
                   key=lambda p: (p.name, str(p)))
    latin = _unique_by_name(
        spec for path in files if path.name.startswith(_LATIN_FONT_PREFIXES)
        if (spec := _usable_font(path, 0, LATIN_CHARS)) is not None
    )
    if not latin:
        searched = ", ".join(str(d) for d in dirs)
        raise InputError(f"no DejaVu or Liberation font found under {searched}; "
                         "install one (apt-get install fonts-dejavu-core) or pass font_dirs")
    cjk_files = [p for p in files if any(marker in p.name.lower().replace("-", "") for marker in _CJK_FONT_MARKERS)]
    cjk = next((spec for path in cjk_files if (spec := _usable_font(path, 0, CJK_CHARS)) is not None), None)
    return DemoFonts(latin=tuple(latin), cjk=cjk)


def _usable_font(path: Path, index: int, required_chars: str) -> FontSpec | None:
    """The font if it loads and has a real glyph for every character in ``required_chars``."""
    try:
        font = ImageFont.truetype(str(path), 24, index=index, layout_engine=ImageFont.Layout.BASIC)
    except OSError:
        return None
    missing = _glyph_signature(font, _MISSING_GLYPH)
    if any(_glyph_signature(font, char) == missing for char in set(required_chars) - {" "}):
        return None
    family, style = font.getname()
    return FontSpec(path=path, index=index, name=f"{family} {style}")


def _glyph_signature(font: ImageFont.FreeTypeFont, char: str) -> tuple:
    mask = font.getmask(char)
    return mask.size, bytes(mask)


def _unique_by_name(specs) -> list[FontSpec]:
    """Drop duplicate faces (the same font installed twice); keeps the first by file name."""
    seen: dict[str, FontSpec] = {}
    for spec in specs:
        seen.setdefault(spec.name, spec)
    return list(seen.values())


@lru_cache(maxsize=512)
def _load_font(path: Path, index: int, size: int) -> ImageFont.FreeTypeFont:
    # BASIC layout: raqm (when installed) may shape differently and break reproducibility across machines.
    return ImageFont.truetype(str(path), size, index=index, layout_engine=ImageFont.Layout.BASIC)


# --------------------------------------------------------------------------- text content

_WORDS = """invoice receipt total amount balance due date order number customer account payment received
shipping address billing item description quantity price unit tax discount subtotal cash card change thank
you for your purchase store branch manager phone email website report summary page section chapter notes
approved signature reference contact office warehouse delivery schedule monday tuesday friday january march
april june october december north south east west street avenue road city center market service support
product model serial version status pending completed cancelled urgent confidential draft final review
meeting agenda project budget annual quarterly sales revenue profit net gross weight size color blue red
green black white small medium large fresh organic coffee tea milk bread apple orange water juice rice
chicken beef fish salad soup lunch dinner breakfast menu table room floor building gate platform ticket
passenger flight train departure arrival terminal seat economy business hotel guest check open closed
welcome please keep this copy valid until return policy within days original packaging""".split()
_LABELS = ("Total", "Subtotal", "Tax", "Date", "Invoice No.", "Order", "Account", "Ref", "Amount Due",
           "Balance", "Qty", "Tel", "Page", "Cashier", "Table", "Seat", "Gate", "Room")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_CODE_PREFIXES = ("INV", "PO", "SKU", "REF", "ORD", "TKT", "ID", "NO")
_CN_PHRASES = """发票号码 合计金额 欢迎光临 谢谢惠顾 收款员 会员积分 商品名称 规格型号 单价 数量 小计 总计 折扣 税额 备注
客户名称 订单编号 联系电话 联系地址 有限公司 北京市朝阳区 上海市浦东新区 广州市天河区 深圳市南山区 中国银行 营业时间
停车场出口 注意安全 禁止吸烟 服务热线 请妥善保管小票 现金支付 找零 开票日期 收货地址 生产日期 保质期 产品说明书
操作指南 会议纪要 项目预算 年度报告 第一季度 销售收入 净利润 办公室 仓库 配送中心 快递单号 图书馆 借阅日期 归还日期
人民币 银行卡 手机号码 身份证号 学校 医院 药品 每日两次 饭后服用 温馨提示 出发时间 到达时间 座位号 检票口""".split()
_CN_LABELS = ("合计", "金额", "日期", "单号", "电话", "数量", "单价", "编号", "时间", "座位")

LATIN_CHARS = ("".join(sorted(set("".join(_WORDS + list(_LABELS) + list(_MONTHS) + list(_CODE_PREFIXES)))))
               + "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 $¥%#:-/.,@()+&*")
CJK_CHARS = "".join(sorted(set("".join(_CN_PHRASES + list(_CN_LABELS)) + "年月日元：")))


def _styled(text: str, rng: random.Random) -> str:
    style = rng.random()
    if style < 0.25:
        return text.upper()
    if style < 0.6:
        return text.title()
    return text


def _text_words(rng: random.Random) -> str:
    return _styled(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 4))), rng)


def _text_number(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.35:
        return f"{rng.randint(1000, 999999):,}"
    if kind < 0.65:
        return f"{rng.uniform(0, 1000):.{rng.randint(1, 3)}f}"
    if kind < 0.85:
        return f"{rng.uniform(0, 100):.1f}%"
    return str(rng.randint(0, 99999))


def _text_price(rng: random.Random) -> str:
    amount = f"{rng.uniform(0.5, 5000):,.2f}" if rng.random() < 0.7 else str(rng.randint(1, 999))
    return rng.choice(("${}", "¥{}", "USD {}", "{} USD", "RMB {}")).format(amount)


def _text_date(rng: random.Random) -> str:
    year, month, day = rng.randint(1998, 2030), rng.randint(1, 12), rng.randint(1, 28)
    hour, minute = rng.randint(0, 23), rng.randint(0, 59)
    return rng.choice((
        f"{year}-{month:02d}-{day:02d}", f"{day:02d}/{month:02d}/{year}", f"{month:02d}.{day:02d}.{year}",
        f"{_MONTHS[month - 1]} {day}, {year}", f"{day} {_MONTHS[month - 1].upper()} {year}",
        f"{year}/{month}/{day} {hour:02d}:{minute:02d}", f"{hour:02d}:{minute:02d}",
    ))


def _text_code(rng: random.Random) -> str:
    alnum = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"
    block = "".join(rng.choice(alnum) for _ in range(4))
    prefix = rng.choice(_CODE_PREFIXES)
    return rng.choice((
        f"{prefix}-{rng.randint(2015, 2030)}-{rng.randint(0, 9999):04d}", f"{prefix}#{rng.randint(100, 99999)}",
        f"{prefix} {rng.randint(100, 9999)}-{rng.choice(alnum)}", f"{block}-{''.join(rng.choice(alnum) for _ in range(4))}",
        f"#{rng.randint(0, 99999):05d}",
    ))


def _text_contact(rng: random.Random) -> str:
    word = rng.choice(_WORDS)
    return rng.choice((
        f"Tel: +{rng.randint(1, 99)} {rng.randint(100, 999)} {rng.randint(1000, 9999)}",
        f"{word}@example.com", f"www.{word}-shop.com", f"({rng.randint(100, 999)}) {rng.randint(100, 999)}-{rng.randint(1000, 9999)}",
    ))


def _text_label_value(rng: random.Random) -> str:
    label = rng.choice(_LABELS)
    value = rng.choice((_text_price, _text_number, _text_date, _text_code))(rng)
    return f"{label}: {value}" if rng.random() < 0.8 else f"{label} {value}"


def _text_chinese(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.45:
        return "".join(rng.choice(_CN_PHRASES) for _ in range(rng.randint(1, 2)))
    label = rng.choice(_CN_LABELS + tuple(_CN_PHRASES[:12]))
    if kind < 0.65:
        return f"{label}：{rng.randint(1998, 2030)}年{rng.randint(1, 12)}月{rng.randint(1, 28)}日"
    if kind < 0.85:
        return f"{label}：¥{rng.uniform(1, 9999):.2f}" if rng.random() < 0.5 else f"{label}：{rng.randint(1, 999)}元"
    return f"{label}：{_text_code(rng)}"


_LATIN_TEXTS: tuple[tuple[Callable[[random.Random], str], float], ...] = (
    (_text_words, 0.32), (_text_label_value, 0.24), (_text_price, 0.08), (_text_number, 0.08),
    (_text_date, 0.10), (_text_code, 0.12), (_text_contact, 0.06),
)


def _random_text(rng: random.Random, chinese: bool) -> str:
    """One text line of at most ``MAX_TEXT_LEN`` characters."""
    while True:
        if chinese:
            text = _text_chinese(rng)
        else:
            makers, weights = zip(*_LATIN_TEXTS)
            text = rng.choices(makers, weights)[0](rng)
        if 0 < len(text) <= MAX_TEXT_LEN:
            return text


# --------------------------------------------------------------------------- drawing


@dataclass(frozen=True)
class _Style:
    """How hard one image is: degradation strengths drawn from a difficulty in [0, 1]."""

    blur_sigma: float
    noise_std: float
    jpeg_quality: int
    text_rgb: tuple[int, int, int]
    downscale: float  # < 1 renders a low-resolution look (shrink, then enlarge back)


def _draw_style(rng: np.random.Generator) -> _Style:
    difficulty = float(rng.beta(1.3, 1.8))
    darkness = 0 if difficulty < 0.6 else rng.uniform(0, 110 * (difficulty - 0.5))
    base = rng.integers(0, 70, size=3) + int(darkness)
    return _Style(
        blur_sigma=float(rng.uniform(0, 1.6 * difficulty)) if rng.random() < 0.75 else 0.0,
        noise_std=float(rng.uniform(0, 16 * difficulty)),
        jpeg_quality=int(rng.integers(int(95 - 60 * difficulty), 96)),
        text_rgb=tuple(int(v) for v in np.clip(base, 0, 200)),
        downscale=float(rng.uniform(0.45, 0.8)) if difficulty > 0.7 and rng.random() < 0.5 else 1.0,
    )


def _background(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A light, paper-like RGB float image: tinted gradient, blotchy texture, grain, sometimes ruled lines."""
    tint_a = rng.uniform(185, 255, size=3)
    tint_b = np.clip(tint_a + rng.uniform(-40, 25, size=3), 150, 255)
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (xs * np.cos(angle) + ys * np.sin(angle))
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    image = tint_a + (tint_b - tint_a) * ramp[..., None]
    blotches = rng.normal(0, 1, size=(max(height // 24, 2), max(width // 24, 2))).astype(np.float32)
    image += cv2.resize(blotches, (width, height), interpolation=cv2.INTER_CUBIC)[..., None] * rng.uniform(0, 12)
    image += rng.normal(0, rng.uniform(0, 6), size=(height, width, 1))
    if rng.random() < 0.35:
        _draw_ruled_lines(image, rng)
    return image.astype(np.float32)


def _draw_ruled_lines(image: np.ndarray, rng: np.random.Generator) -> None:
    height, width = image.shape[:2]
    spacing = int(rng.integers(18, 60))
    color = np.clip(image.mean(axis=(0, 1)) - rng.uniform(20, 60, size=3), 0, 255)
    for y in range(int(rng.integers(0, spacing)), height, spacing):
        image[y, :] = image[y, :] * 0.4 + color * 0.6
    if rng.random() < 0.4:
        x = int(rng.integers(width // 12, width // 6 + 1))
        image[:, x:x + 2] = image[:, x:x + 2] * 0.5 + np.array([200, 80, 80]) * 0.5


@dataclass(frozen=True)
class _RenderedLine:
    """A text line drawn as coverage (0..1) on its own canvas, with its rotated quadrilateral."""

    alpha: np.ndarray  # float32, H x W
    quad: np.ndarray  # 4 x 2 float, tl, tr, br, bl in canvas pixels


def _render_line(text: str, font: ImageFont.FreeTypeFont, angle_deg: float) -> _RenderedLine:
    """Draw ``text`` white-on-black, rotate it by ``angle_deg`` (counter-clockwise), track its box."""
    left, top, right, bottom = font.getbbox(text)
    pad = 2 + font.size // 4
    canvas = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    ImageDraw.Draw(canvas).text((pad - left, pad - top), text, fill=255, font=font)
    margin = 1 + font.size // 16  # annotated boxes hug the ink with a pixel or two to spare
    quad = np.array([[pad - margin, pad - margin], [canvas.width - pad + margin, pad - margin],
                     [canvas.width - pad + margin, canvas.height - pad + margin],
                     [pad - margin, canvas.height - pad + margin]], dtype=np.float64)
    alpha = np.asarray(canvas, dtype=np.float32) / 255.0
    if abs(angle_deg) < 1e-3:
        return _RenderedLine(alpha, quad)
    height, width = alpha.shape
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), angle_deg, 1.0)
    corners = np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float64)
    moved = corners @ matrix[:, :2].T + matrix[:, 2]
    matrix[:, 2] -= moved.min(axis=0)
    new_w, new_h = np.ceil(moved.max(axis=0) - moved.min(axis=0)).astype(int)
    rotated = cv2.warpAffine(alpha, matrix, (int(new_w), int(new_h)), flags=cv2.INTER_LINEAR, borderValue=0.0)
    return _RenderedLine(rotated, quad @ matrix[:, :2].T + matrix[:, 2])


def _composite(image: np.ndarray, line: _RenderedLine, x: int, y: int, rgb: tuple[int, int, int]) -> np.ndarray:
    """Blend ``line`` into ``image`` with its top-left at (x, y); return the quad in image pixels."""
    height, width = line.alpha.shape
    alpha = line.alpha[..., None]
    region = image[y:y + height, x:x + width]
    region[:] = region * (1 - alpha) + np.array(rgb, dtype=np.float32) * alpha
    return line.quad + (x, y)


def _degrade(image: np.ndarray, style: _Style, rng: np.random.Generator) -> np.ndarray:
    """Apply resolution loss, blur and noise; returns uint8 RGB."""
    height, width = image.shape[:2]
    if style.downscale < 1.0:
        small = (max(int(width * style.downscale), 1), max(int(height * style.downscale), 1))
        image = cv2.resize(cv2.resize(image, small, interpolation=cv2.INTER_AREA), (width, height),
                           interpolation=cv2.INTER_LINEAR)
    if style.blur_sigma > 0.2:
        image = cv2.GaussianBlur(image, (0, 0), style.blur_sigma)
    if style.noise_std > 0:
        image = image + rng.normal(0, style.noise_std, size=image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _save_jpeg(pixels: np.ndarray, path: Path, quality: int) -> None:
    Image.fromarray(pixels, "RGB").save(path, format="JPEG", quality=quality)


# --------------------------------------------------------------------------- samples


class _FontPicker:
    """Chooses a font and the text to draw with it (Chinese only when a CJK font exists)."""

    def __init__(self, fonts: DemoFonts) -> None:
        self.fonts = fonts

    def pick(self, rng: random.Random, size: int) -> tuple[str, ImageFont.FreeTypeFont]:
        chinese = self.fonts.cjk is not None and rng.random() < 0.3
        spec = self.fonts.cjk if chinese else rng.choice(self.fonts.latin)
        return _random_text(rng, chinese), _load_font(spec.path, spec.index, size)


def _make_det_page(seed: int, picker: _FontPicker) -> tuple[np.ndarray, int, list[dict]]:
    """One document page: returns (uint8 RGB image, JPEG quality, PaddleOCR det boxes)."""
    page = _PageLayout(seed, picker)
    page.fill()
    image, quads = _rotate_page(page.image, page.quads, page.angle)
    height, width = image.shape[:2]
    boxes = [_det_box(text, quad, width, height) for text, quad in zip(page.texts, quads)]
    return _degrade(image, page.style, page.rng), page.style.jpeg_quality, boxes


class _PageLayout:
    """Lays text rows out top to bottom on an upright page; the page is rotated afterwards."""

    MIN_LINES, MAX_LINES = 4, 12

    def __init__(self, seed: int, picker: _FontPicker) -> None:
        self.rng, self.rand, self.picker = np.random.default_rng(seed), random.Random(seed), picker
        height, width = int(self.rng.integers(560, 736)), int(self.rng.integers(560, 736))
        self.image = _background(height, width, self.rng)
        self.style = _draw_style(self.rng)
        self.margin = int(self.rng.integers(24, 56))
        self.angle = float(self.rng.uniform(-3, 3)) if self.rng.random() < 0.6 else 0.0
        self.texts: list[str] = []
        self.quads: list[np.ndarray] = []

    def fill(self) -> None:
        """Draw 4-12 rows of text (sizes chosen so that they fit), sometimes a faint "###" footnote."""
        height, width = self.image.shape[:2]
        n_rows = int(self.rng.integers(self.MIN_LINES, self.MAX_LINES + 1))
        max_size = int(min(48, (height - 2 * self.margin - 16) / (n_rows * 1.7)))
        y = self.margin + int(self.rng.integers(0, 16))
        for _ in range(n_rows):
            size = int(self.rng.integers(18, max(max_size, 18) + 1))
            bottom = self._draw_row(size, y)
            if bottom is None:
                break
            y = bottom + int(size * self.rng.uniform(0.35, 1.0))
        if self.rng.random() < 0.3:
            self._draw_footnote(y)

    def _draw_row(self, size: int, y: int) -> int | None:
        """One text, sometimes with a right-aligned second one; returns the row's bottom, None if full."""
        height, width = self.image.shape[:2]
        n_texts = 2 if self.rng.random() < 0.25 else 1
        gap = 3 * size if n_texts == 2 else 0
        lines = [self._fitting_line(size, (width - 2 * self.margin - gap) // n_texts) for _ in range(n_texts)]
        if y + max(line.alpha.shape[0] for _, line in lines) > height - self.margin:
            return None
        slack = width - 2 * self.margin - gap - sum(line.alpha.shape[1] for _, line in lines)
        xs = [self.margin + int(self.rng.integers(0, max(min(width // 5, slack), 1)))]
        if n_texts == 2:
            xs.append(width - self.margin - lines[1][1].alpha.shape[1])
        for (text, line), x in zip(lines, xs):
            self._draw(text, line, x, y, self.style.text_rgb)
        return y + max(line.alpha.shape[0] for _, line in lines)

    def _fitting_line(self, size: int, max_width: int) -> tuple[str, _RenderedLine]:
        """A random text at ``size``, slightly tilted, at most ``max_width`` wide (shrinking if need be)."""
        while True:
            text, font = self.picker.pick(self.rand, size)
            line = _render_line(text, font, float(self.rng.uniform(-1.0, 1.0)))
            if line.alpha.shape[1] <= max_width or size <= 8:
                return text, line
            size = max(int(size * 0.85), 8)

    def _draw_footnote(self, y_free: int) -> None:
        """A tiny, faint line marked "###": PaddleOCR excludes such boxes from the metric."""
        height, width = self.image.shape[:2]
        text, font = self.picker.pick(self.rand, int(self.rng.integers(9, 13)))
        line = _render_line(text, font, 0.0)
        line_h, line_w = line.alpha.shape
        y = height - self.margin // 2 - line_h
        if line_w >= width - 2 * self.margin or y < y_free:
            return
        faint = tuple(int(v + 0.45 * (200 - v)) for v in self.style.text_rgb)
        self._draw(IGNORE_TRANSCRIPTION, line, self.margin, y, faint)

    def _draw(self, text: str, line: _RenderedLine, x: int, y: int, rgb: tuple[int, int, int]) -> None:
        self.texts.append(text)
        self.quads.append(_composite(self.image, line, x, y, rgb))


def _rotate_page(image: np.ndarray, quads: list[np.ndarray], angle_deg: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """Rotate the page about its centre (edges filled by reflection), moving the quads along.

    The angle is halved until every quad stays inside the page, so no text is cut off.
    """
    height, width = image.shape[:2]
    for _attempt in range(4):
        if abs(angle_deg) < 0.1:
            return image, quads
        matrix = cv2.getRotationMatrix2D((width / 2, height / 2), angle_deg, 1.0)
        moved = [quad @ matrix[:, :2].T + matrix[:, 2] for quad in quads]
        if all(q.min() >= 0 and q[:, 0].max() <= width - 1 and q[:, 1].max() <= height - 1 for q in moved):
            break
        angle_deg /= 2
    else:
        return image, quads
    rotated = cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    return rotated, moved


def _det_box(text: str, quad: np.ndarray, width: int, height: int) -> dict:
    clipped = np.clip(np.rint(quad), [0, 0], [width - 1, height - 1]).astype(int)
    return {"transcription": text, "points": clipped.tolist()}


def _make_rec_line(seed: int, picker: _FontPicker) -> tuple[np.ndarray, int, str]:
    """One cropped text line 32-64 px high: returns (uint8 RGB image, JPEG quality, label)."""
    rng, rand = np.random.default_rng(seed), random.Random(seed)
    target_h = int(rng.integers(32, 65))
    size = max(int(target_h * rng.uniform(0.5, 0.8)), 10)
    text, font = picker.pick(rand, size)
    angle = float(rng.uniform(-2.5, 2.5)) if rng.random() < 0.5 else 0.0
    line = _render_line(text, font, angle)
    ink_top, ink_bottom = line.quad[:, 1].min(), line.quad[:, 1].max()
    ink_left, ink_right = line.quad[:, 0].min(), line.quad[:, 0].max()
    extra_h = max(target_h - (ink_bottom - ink_top), 2)
    top = int(ink_top - extra_h * rng.uniform(0.3, 0.7))
    left = int(ink_left - rng.integers(2, max(size // 2, 3) + 1))
    crop_h = int(ink_bottom - ink_top + extra_h)
    crop_w = int(ink_right + rng.integers(2, max(size // 2, 3) + 1)) - left
    image = _background(crop_h, crop_w, rng)
    canvas = np.zeros((crop_h, crop_w), dtype=np.float32)
    src_y0, src_x0 = max(top, 0), max(left, 0)
    src = line.alpha[src_y0:top + crop_h, src_x0:left + crop_w]
    canvas[src_y0 - top:src_y0 - top + src.shape[0], src_x0 - left:src_x0 - left + src.shape[1]] = src
    style = _draw_style(rng)
    _composite(image, _RenderedLine(canvas, line.quad), 0, 0, style.text_rgb)
    return _degrade(image, style, rng), style.jpeg_quality, text


# --------------------------------------------------------------------------- writing


def _sample_seed(seed: int, task: str, split: str, index: int) -> int:
    """Independent seed per image, so images do not depend on counts and splits never share one."""
    sequence = np.random.SeedSequence([seed, TASKS.index(task), SPLITS.index(split), index])
    return int(sequence.generate_state(1, dtype=np.uint64)[0])


def _write_dataset(root: Path, seed: int, counts: DemoCounts, fonts: DemoFonts, show_progress: bool) -> dict:
    picker = _FontPicker(fonts)
    total = sum(counts.of(task, split) for task in TASKS for split in SPLITS)
    label_hashes = {}
    with tqdm(total=total, desc="demo data", unit="img", disable=not show_progress) as progress:
        for task in TASKS:
            for split in SPLITS:
                lines = []
                (root / task / split).mkdir(parents=True)
                for index in range(counts.of(task, split)):
                    relative = f"{split}/{split}_{index:05d}.jpg"
                    lines.append(_write_sample(root / task / relative, relative, task,
                                               _sample_seed(seed, task, split, index), picker))
                    progress.update(1)
                label_path = root / task / f"{split}.txt"
                label_path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
                label_hashes[f"{task}/{split}.txt"] = _sha256(label_path)
    manifest = {"generator": "compress.data.demo", "generator_version": GENERATOR_VERSION, "seed": seed,
                "counts": asdict(counts), "fonts": fonts.names, "label_files_sha256": label_hashes}
    (root / "README.txt").write_text(_readme(seed, counts, fonts), encoding="utf-8")
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


def _write_sample(path: Path, relative: str, task: str, sample_seed: int, picker: _FontPicker) -> str:
    if task == "det":
        pixels, quality, boxes = _make_det_page(sample_seed, picker)
        label = json.dumps(boxes, ensure_ascii=False)
    else:
        pixels, quality, label = _make_rec_line(sample_seed, picker)
    _save_jpeg(pixels, path, quality)
    return f"{relative}\t{label}"


def _readme(seed: int, counts: DemoCounts, fonts: DemoFonts) -> str:
    return (
        "Synthetic OCR demo data made by compress.data.demo.generate_demo_data (tools/make_demo_data.py).\n"
        "Not real documents: rendered text on textured backgrounds with rotation, blur, noise and JPEG loss,\n"
        "meant for demos, smoke tests and calibration of PP-OCR compression, not for judging a model.\n\n"
        "det/{train,eval,calib}.txt  PaddleOCR detection labels: img_path\\t[{\"transcription\", \"points\"}...]\n"
        "                            (paths relative to det/; \"###\" marks boxes to ignore)\n"
        "rec/{train,eval,calib}.txt  PaddleOCR recognition labels: img_path\\ttext (paths relative to rec/)\n\n"
        f"seed: {seed}\ncounts: {json.dumps(asdict(counts))}\nfonts: {', '.join(fonts.names)}\n"
        "manifest.json records the sha256 of every label file.\n"
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _move_into_place(tmp: Path, out: Path) -> None:
    """Swap the finished data set in; the old one (only reached with force) is removed after the swap."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old)


def _read_manifest(out: Path) -> dict | None:
    path = out / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: unreadable manifest ({exc}); pass --force to regenerate the data") from None


def _manifest_matches(manifest: dict, seed: int, counts: DemoCounts) -> bool:
    return (manifest.get("generator_version") == GENERATOR_VERSION and manifest.get("seed") == seed
            and manifest.get("counts") == asdict(counts))


def _check_label_hashes(out: Path, manifest: dict) -> None:
    for relative, expected in manifest.get("label_files_sha256", {}).items():
        path = out / relative
        if not path.is_file() or _sha256(path) != expected:
            raise InputError(f"{path}: missing or changed since generation (sha256 differs from manifest.json); "
                             "pass --force to regenerate the demo data")


def _summary(out: Path, manifest: dict, generated: bool) -> dict:
    return {
        "out_dir": str(out.resolve()),
        "seed": manifest["seed"],
        "counts": dict(manifest["counts"]),
        "fonts": list(manifest["fonts"]),
        "label_files": {f"{task}_{split}": str((out / task / f"{split}.txt").resolve())
                        for task in TASKS for split in SPLITS},
        "generated": generated,
    }
