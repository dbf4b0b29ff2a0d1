"""The `pio-vllm` command line (the edge: it builds settings and hands them down).

    pio-vllm demo [--config FILE] [--model PATH_OR_ID] [--batch N] [--interactive N]
                  [--max-tokens N]
    pio-vllm serve [--config FILE] [vllm serve flags ...]
    pio-vllm serve-replicas --replicas N [--port P] [--policy power_of_two] [serve flags ...]
    pio-vllm config [--config FILE]
    pio-vllm bench SCENARIO [--mode inproc|server] [--repeats N] [--preset P]
    pio-vllm make-model DIR [--preset tiny|qwen3-vl-2b] [--seed N] [--overwrite]
    pio-vllm simulate --config FILE (--trace CSV | --scenario NAME) [--replicas A..B] ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = "tiny-cpu.yaml"


def default_config_path() -> Path:
    """configs/tiny-cpu.yaml of the working directory, else of the source checkout."""
    local = Path("configs") / DEFAULT_CONFIG
    return local if local.is_file() else REPO_CONFIGS / DEFAULT_CONFIG


def _quiet_vllm(verbose: bool) -> None:
    # vLLM configures its loggers when first imported and its child processes inherit the
    # environment, so this must run before any vLLM import.
    if not verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # PIO_LOG_LEVEL=DEBUG: pio's own loggers only (per-request stage times, for instance)
    if os.environ.get("PIO_LOG_LEVEL"):
        from pio_vllm.errors import ConfigError
        from pio_vllm.settings import pio_log_level

        try:
            logging.getLogger("pio_vllm").setLevel(pio_log_level())
        except ConfigError as e:
            raise SystemExit(f"pio-vllm: error: {e}") from None


def _cmd_make_model(args: argparse.Namespace) -> int:
    from pio_vllm.model_builder import build_model

    logging.getLogger("pio_vllm").setLevel(logging.INFO)
    print(f"building {args.preset} Qwen3-VL checkpoint in {args.dir} ...", flush=True)
    info = build_model(args.dir, preset=args.preset, seed=args.seed, device=args.device,
                       overwrite=args.overwrite)
    print(json.dumps(info, indent=2))
    return 0


def _load_settings(args: argparse.Namespace, **extra: Any) -> Any:
    from pio_vllm.settings import PioSettings

    config = args.config or default_config_path()
    settings = PioSettings.load(config, **extra)
    if getattr(args, "model", None):
        settings = settings.model_copy(update={"engine": {**settings.engine, "model": args.model}})
    return settings


def _cmd_demo(args: argparse.Namespace) -> int:
    settings = _load_settings(args)  # a bad config fails here, before vLLM is imported

    from pio_vllm.demo import run_demo

    return asyncio.run(run_demo(settings, args.batch, args.interactive, args.max_tokens))


def _cmd_serve(args: argparse.Namespace) -> int:
    from pio_vllm.plugin import default_config_for_device
    from pio_vllm.server.launcher import main as serve_main
    from pio_vllm.settings import PioSettings

    # Without --config: $PIO_CONFIG, else the Qwen3-VL-2B config for this machine's device.
    default = PioSettings.env_config_path() or str(default_config_for_device())
    return serve_main(args.rest, default)


def _cmd_serve_replicas(args: argparse.Namespace) -> int:
    from pio_vllm.server.replicas import main as replicas_main

    return replicas_main(args.rest)


def _cmd_config(args: argparse.Namespace) -> int:
    import textwrap

    from pio_vllm.settings import PioSettings, explain

    path = args.config or PioSettings.env_config_path() or default_config_path()
    settings = PioSettings.load(path)
    print(f"pio-vllm settings from {path} (sources, highest first: override, env PIO_*, "
          "file, default)")
    for line in explain(settings, path):
        print(f"{line.name} = {line.value!r}  [{line.source}]")
        if line.description:
            print(textwrap.fill(line.description, width=96, initial_indent="    ",
                                subsequent_indent="    "))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib.util

    missing = [m for m in ("matplotlib", "scipy", "httpx_sse")
               if importlib.util.find_spec(m) is None]
    if missing:
        # a machine without them (the GPU device's offline bundle) still records every round;
        # `python -m benchmarks.rereport` adds the intervals, verdicts and plots elsewhere
        print(f"pio-vllm bench: {', '.join(missing)} not installed (the `bench` extra: uv run "
              "--extra cpu --extra bench ...); records will lack what needs them",
              file=sys.stderr)
    # The benchmarks live in the source checkout next to the package, not in the wheel.
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "scenarios.py").is_file():
        print("pio-vllm bench runs from a source checkout (benchmarks/ not found)",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(root))
    os.chdir(root)
    from benchmarks.scenarios import main as bench_main

    return bench_main(args.rest)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from pio_vllm.sim.cli import main as simulate_main

    return simulate_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pio-vllm",
        description="Priority-aware serving of Qwen3-VL on vLLM.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show vLLM's INFO logs")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="a flood of batch work with interactive requests arriving during it; "
        "prints a per-request table and per-class TTFT")
    demo.add_argument("--config", type=Path, default=None,
                      help=f"settings YAML (default: configs/{DEFAULT_CONFIG})")
    demo.add_argument("--model", default=None,
                      help="Qwen3-VL checkpoint path, hub id or pio:PRESET (overrides config)")
    demo.add_argument("--batch", type=int, default=24, help="batch requests in the flood")
    demo.add_argument("--interactive", type=int, default=6,
                      help="interactive requests arriving during the flood")
    demo.add_argument("--max-tokens", type=int, default=128,
                      help="output tokens per batch request")
    demo.set_defaults(func=_cmd_demo)

    serve = sub.add_parser(
        "serve", add_help=False,
        help="OpenAI-compatible server (vLLM's) with pio in the request path; "
        "`pio-vllm serve --help` lists vLLM's flags",
    )
    serve.add_argument("rest", nargs=argparse.REMAINDER,
                       help="--config FILE (pio settings) and any `vllm serve` flag")
    serve.set_defaults(func=_cmd_serve)

    replicas = sub.add_parser(
        "serve-replicas", add_help=False,
        help="N `pio-vllm serve` replicas behind vllm-router (the `router` extra); "
        "`pio-vllm serve-replicas --help`")
    replicas.add_argument("rest", nargs=argparse.REMAINDER)
    replicas.set_defaults(func=_cmd_serve_replicas)

    bench = sub.add_parser(
        "bench", add_help=False,
        help="A/B benchmark against plain vLLM: overhead, priority-inversion, "
        "mixed-resolution, burst-overload, smoke (`pio-vllm bench --help`)",
    )
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=_cmd_bench)

    simulate = sub.add_parser(
        "simulate", add_help=False,
        help="pio and plain vLLM on a modelled engine: vLLM's scheduler, pio's admission, a "
        "step-time profile, replicas behind a router (`pio-vllm simulate --help`)")
    simulate.add_argument("rest", nargs=argparse.REMAINDER)
    simulate.set_defaults(func=_cmd_simulate)

    config = sub.add_parser(
        "config", help="print the effective settings with their sources and descriptions "
        "(the settings reference)")
    config.add_argument("--config", type=Path, default=None,
                        help="settings YAML (default: $PIO_CONFIG, else configs/"
                        f"{DEFAULT_CONFIG})")
    config.set_defaults(func=_cmd_config)

    make = sub.add_parser("make-model", help="write a random-weight Qwen3-VL checkpoint")
    make.add_argument("dir", type=Path, help="output directory")
    make.add_argument("--preset", default="tiny", choices=["tiny", "qwen3-vl-2b"])
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--device", default="cpu", help="torch device to initialise weights on")
    make.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
    make.set_defaults(func=_cmd_make_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    head = [a for a in argv if a not in ("-v", "--verbose")]
    passthrough = {"serve": _cmd_serve, "bench": _cmd_bench,
                   "serve-replicas": _cmd_serve_replicas, "simulate": _cmd_simulate}
    if head[:1] and head[0] in passthrough:
        # Their flags start with "--"; argparse's REMAINDER would not collect them.
        args = argparse.Namespace(verbose=head[0] == "serve" or len(head) != len(argv),
                                  command=head[0], func=passthrough[head[0]], rest=head[1:])
    else:
        args = build_parser().parse_args(argv)
    _quiet_vllm(args.verbose)
    from pio_vllm.errors import PioError

    try:
        code: int = args.func(args)
    except PioError as e:
        print(f"pio-vllm: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
