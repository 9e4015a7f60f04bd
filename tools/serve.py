"""Serve OCR over HTTP, baseline and candidate side by side: ``python tools/serve.py -c configs/serve.yml``.

Overrides: ``-o Section.key=value`` (as ``tools/run.py``) and the flags ``--host``, ``--port``, ``--candidate DIR``
(a folder with ``det/`` and ``rec/``, e.g. a run's ``delivered/``), ``--baseline DIR`` (the same) and ``--run RUN``
(candidate ``RUN/delivered``, baseline the run's baseline exports). Routes, routing, shadow traffic, guardrails and
limits: ``export/serving/`` and ``configs/serve.yml``.

The models load before the port opens; then one line ``listening on http://HOST:PORT`` goes to stdout (``--port
0`` picks a free port). Config and model-folder errors are one line on stderr with exit code 2.
"""
import zlib  # noqa: F401  (before paddle: see compress/__init__.py)
import argparse
import json
import logging
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from compress.errors import InputError, run_cli  # noqa: E402

logger = logging.getLogger("export.serving")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", required=True, help="serving config (YAML), e.g. configs/serve.yml")
    parser.add_argument("-o", "--opt", nargs="+", action="extend", default=[], metavar="SECTION.KEY=VALUE",
                        help="override config values; values are parsed as YAML")
    parser.add_argument("--host", help="listen address (Server.host)")
    parser.add_argument("--port", type=int, help="listen port (Server.port; 0: a free one)")
    parser.add_argument("--candidate", metavar="DIR", help="candidate folder with det/ and rec/ (a run's delivered/)")
    parser.add_argument("--baseline", metavar="DIR", help="baseline folder with det/ and rec/")
    parser.add_argument("--run", metavar="RUN_DIR", help="candidate RUN_DIR/delivered, baseline the run's baseline "
                                                          "exports")
    return parser.parse_args(argv)


def flag_overrides(args):
    """The flags as ``-o`` overrides (applied after the ``-o`` ones, so they win)."""
    def quoted(value):
        return json.dumps(value)  # JSON is YAML: paths with ':' or spaces stay strings

    out = []
    if args.host:
        out.append(f"Server.host={quoted(args.host)}")
    if args.port is not None:
        out.append(f"Server.port={args.port}")
    if args.run:
        out += [f"Variants.candidate.model_dir={quoted(os.path.join(args.run, 'delivered'))}",
                "Variants.candidate.baseline_of=null",
                f"Variants.baseline.baseline_of={quoted(args.run)}", "Variants.baseline.model_dir=null"]
    for name in ("candidate", "baseline"):
        if getattr(args, name):
            out += [f"Variants.{name}.model_dir={quoted(getattr(args, name))}", f"Variants.{name}.baseline_of=null"]
    return out


def api_key(cfg):
    """The admin key from the environment variable ``Auth.api_key_env`` (None: admin endpoints off)."""
    name = cfg.Auth.api_key_env
    if not name:
        return None
    key = os.environ.get(name, "").strip()
    if not key:
        logger.warning("admin endpoints are off: Auth.api_key_env names %s, which is not set", name)
        return None
    return key


def listen_socket(host, port):
    """A bound socket (the port is known before uvicorn starts); InputError when the address is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on such sockets; without it every response waited
    # ~40 ms for the client's delayed ACK (measured: 44 ms per /healthz instead of 0.5 ms)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror}; choose another Server.port / --port")
    return sock


def describe(name, pool):
    info = pool.info
    backends = "+".join(info.get("backends", {}).values()) or info["backend"]
    return (f"{name} (det {info['det']}, rec {info['rec']}; {backends}, {info['threads']} thread(s) x "
            f"{info['workers']} worker(s), loaded in {info['load_seconds']:.1f} s)")


def main(argv=None):
    args = parse_args(argv)
    return run_cli(lambda: _run(args), "interrupted")


def _run(args):
    from export.serving.config import load_serve_config

    cfg = load_serve_config(args.config, list(args.opt) + flag_overrides(args))
    logging.basicConfig(level=getattr(logging, cfg.Server.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(message)s")
    import uvicorn

    from export.serving.app import build_app
    from export.serving.routing import VARIANTS
    from export.serving.service import OcrService
    from export.serving.variants import load_variant

    pools = {}
    try:
        for name in VARIANTS:
            pools[name] = load_variant(name, getattr(cfg.Variants, name), cfg.Limits.drop_score,
                                       f"{cfg.source}: Variants.{name}")
        key = api_key(cfg)
        sock = listen_socket(cfg.Server.host, cfg.Server.port)
    except BaseException:
        for pool in pools.values():
            pool.close()
        raise
    host, port = sock.getsockname()[:2]
    routing = cfg.Routing
    print(f"listening on http://{host}:{port}  {describe('baseline', pools['baseline'])}; "
          f"{describe('candidate', pools['candidate'])}; candidate share {routing.canary_share:g}, steps "
          f"{list(routing.rollout_steps)}, shadow {'on' if routing.shadow else 'off'}, admin "
          f"{'on' if key else 'off'}", flush=True)
    server = uvicorn.Server(uvicorn.Config(build_app(OcrService(cfg, pools, key)), log_config=None,
                                           log_level=cfg.Server.log_level, access_log=cfg.Server.access_log,
                                           timeout_graceful_shutdown=int(cfg.Limits.timeout_s) + 1))
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
