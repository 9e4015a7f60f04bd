"""The serving config (``configs/serve.yml``): sections ``Server``, ``Variants``, ``Routing``, ``Guardrails``,
``Limits``, ``Auth``, parsed strictly into frozen dataclasses with :func:`compress.config.parse_section` (unknown
keys name the file, the key path and the nearest valid key; exit code 2 through ``tools/serve.py``).

``-o Section.key=value`` overrides apply as in ``tools/run.py``. Paths are relative to the current directory.
"""
import typing
from dataclasses import dataclass, field
from typing import List, Optional

from compress.config import apply_overrides, parse_section, read_yaml, unknown_key_error
from compress.errors import ConfigError


def _check_share(value, where):
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{where}: {value} is not a share; use a number from 0 to 1 (0.1 = 10% of requests)")


def _check_positive(obj, where, *names):
    for name in names:
        if getattr(obj, name) <= 0:
            raise ConfigError(f"{where}.{name}: must be positive, got {getattr(obj, name)}")


@dataclass(frozen=True)
class ServerConfig:
    """Where the service listens. ``port: 0`` picks a free port (printed on the ``listening on`` line)."""

    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"  # uvicorn's: critical, error, warning, info, debug
    access_log: bool = False  # one uvicorn line per request


@dataclass(frozen=True)
class VariantConfig:
    """One variant's det and rec model folders (exported folders, each with ``deploy.yml``) and how it runs.

    Give ``model_dir`` (a folder holding ``det/`` and ``rec/``, e.g. a run's ``delivered/``), or ``baseline_of``
    (a run directory: the baseline exports of its export stage, ``baseline_fp32/``, or ``fp32/`` when no stage
    changed that model), or both ``det`` and ``rec``; ``det`` / ``rec`` next to one of the others replace that
    model's folder.
    """

    model_dir: Optional[str] = None
    baseline_of: Optional[str] = None
    det: Optional[str] = None
    rec: Optional[str] = None
    backend: Optional[str] = None  # deploy config key for both models; None: each folder's default
    threads: int = 1  # CPU threads per predictor
    workers: int = 1  # loaded OcrSystem copies = requests this variant runs at once

    def validate(self, where):
        if self.model_dir and self.baseline_of:
            raise ConfigError(f"{where}: give model_dir or baseline_of, not both")
        if not (self.model_dir or self.baseline_of or (self.det and self.rec)):
            raise ConfigError(f"{where}: no model folders; set model_dir (a run's delivered/), baseline_of (a run "
                              f"directory) or both det and rec")
        _check_positive(self, where, "threads", "workers")


@dataclass(frozen=True)
class VariantsConfig:
    """The two variants: ``baseline`` answers by default, ``candidate`` gets the canary share."""

    baseline: VariantConfig
    candidate: VariantConfig


@dataclass(frozen=True)
class RoutingConfig:
    """Which variant answers a request, and how the candidate's share grows.

    ``canary_share`` is the candidate's share at start; with ``auto_promote`` it moves to the next of
    ``rollout_steps`` after ``promote_after_s`` seconds at a step with at least ``Guardrails.min_samples`` candidate
    runs, while every guardrail holds. A request carrying ``sticky_header`` is routed by a hash of its value (the
    same key always gets the same variant, and keeps the candidate when the share grows); others at random.
    ``variant_header`` (e.g. ``X-Variant: candidate``) forces a variant, for debugging; null turns it off. With
    ``shadow`` every request also runs on the other variant after it was answered, and the two answers are
    compared; at most ``shadow_queue`` shadow runs wait or run at once, more are skipped (and counted).
    """

    canary_share: float = 0.1
    sticky_header: Optional[str] = "X-Request-Key"
    variant_header: Optional[str] = "X-Variant"
    shadow: bool = True
    shadow_queue: int = 4
    rollout_steps: List[float] = (0.1, 0.5, 1.0)
    auto_promote: bool = True
    promote_after_s: float = 600.0

    def validate(self, where):
        _check_share(self.canary_share, f"{where}.canary_share")
        for index, step in enumerate(self.rollout_steps):
            _check_share(step, f"{where}.rollout_steps[{index}]")
        if list(self.rollout_steps) != sorted(set(self.rollout_steps)):
            raise ConfigError(f"{where}.rollout_steps: {list(self.rollout_steps)} must rise step by step, "
                              f"e.g. [0.1, 0.5, 1.0]")
        _check_positive(self, where, "shadow_queue", "promote_after_s")


@dataclass(frozen=True)
class GuardrailsConfig:
    """When the candidate is rolled back (share 0) automatically, judged over the last ``window`` samples.

    A check is judged once its window holds ``min_samples``: shadow agreement (per request, see
    :mod:`export.serving.agreement`) below ``min_det_agreement`` / ``min_rec_agreement``, the candidate's p99
    inference time above ``max_p99_ratio`` x the baseline's, or its error rate (exceptions and timeouts of its
    runs) above ``max_error_rate``. Null switches a check off.
    """

    window: int = 200
    min_samples: int = 20
    min_det_agreement: Optional[float] = 0.9
    min_rec_agreement: Optional[float] = 0.7
    max_p99_ratio: Optional[float] = 1.5
    max_error_rate: Optional[float] = 0.02

    def validate(self, where):
        _check_positive(self, where, "window", "min_samples")
        if self.min_samples > self.window:
            raise ConfigError(f"{where}.min_samples: {self.min_samples} is more than the window ({self.window})")
        for name in ("min_det_agreement", "min_rec_agreement", "max_error_rate"):
            if getattr(self, name) is not None:
                _check_share(getattr(self, name), f"{where}.{name}")
        if self.max_p99_ratio is not None and self.max_p99_ratio <= 0:
            raise ConfigError(f"{where}.max_p99_ratio: must be positive, got {self.max_p99_ratio}")


@dataclass(frozen=True)
class LimitsConfig:
    """What one request may ask and how much work the service takes at once.

    ``max_concurrency`` requests are processed at once and ``max_queue`` more wait for a slot; beyond that a request
    is answered 429 at once. ``timeout_s`` counts from arrival (waiting included): 504 after it.
    """

    max_request_bytes: int = 8 * 1024 * 1024  # 413 above (a JSON body carries base64: 4/3 of the image file)
    max_image_pixels: int = 4096 * 4096  # 400 above, read from the image header before decoding
    timeout_s: float = 10.0
    max_concurrency: int = 4
    max_queue: int = 16
    drop_score: float = 0.5  # lines recognised below this score are left out (PaddleOCR's default)

    def validate(self, where):
        _check_positive(self, where, "max_request_bytes", "max_image_pixels", "timeout_s", "max_concurrency")
        if self.max_queue < 0:
            raise ConfigError(f"{where}.max_queue: must be 0 or more, got {self.max_queue}")


@dataclass(frozen=True)
class AuthConfig:
    """The admin endpoints' key: read at start from the environment variable ``api_key_env`` (never from this
    file), sent as ``X-API-Key: <key>`` or ``Authorization: Bearer <key>``. Null: the admin endpoints are off."""

    api_key_env: Optional[str] = "OCR_SERVE_API_KEY"


@dataclass(frozen=True)
class ServeConfig:
    """The whole serving config; ``source`` is the file it was read from (for messages)."""

    Variants: VariantsConfig
    Server: ServerConfig = field(default_factory=ServerConfig)
    Routing: RoutingConfig = field(default_factory=RoutingConfig)
    Guardrails: GuardrailsConfig = field(default_factory=GuardrailsConfig)
    Limits: LimitsConfig = field(default_factory=LimitsConfig)
    Auth: AuthConfig = field(default_factory=AuthConfig)
    source: str = ""


SECTIONS = ("Server", "Variants", "Routing", "Guardrails", "Limits", "Auth")


def parse_serve_config(data, source="serve config"):
    """Parse a mapping (the YAML file after overrides) into a ServeConfig.

    Raises:
        ConfigError: unknown section or key (naming ``source``, the key path and the nearest valid key), wrong
            type or value.
    """
    for key in data:
        if key not in SECTIONS:
            raise unknown_key_error(key, SECTIONS, source)
    if "Variants" not in data:
        raise ConfigError(f"{source}: Variants: required; give Variants.baseline and Variants.candidate")
    sections = {name: parse_section(typing.get_type_hints(ServeConfig)[name], data[name], f"{source}: {name}")
                for name in SECTIONS if name in data}
    return ServeConfig(source=source, **sections)


def load_serve_config(path, overrides=()):
    """Read ``path`` (YAML), apply ``-o`` overrides, parse strictly (see :func:`parse_serve_config`)."""
    return parse_serve_config(apply_overrides(read_yaml(path, what="serve config"), overrides), path)
