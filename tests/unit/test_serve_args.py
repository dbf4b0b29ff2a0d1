"""`pio-vllm serve` argument merging: pio config as defaults, vLLM flags override (no engine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pio_vllm.errors import ConfigError
from pio_vllm.server.launcher import parse_args
from tests.helpers import TINY_CONFIG


def test_config_engine_args_are_defaults_and_flags_override() -> None:
    args, settings = parse_args(["--config", str(TINY_CONFIG), "--max-num-seqs", "2",
                                 "--port", "9123"], None)
    assert args.max_num_seqs == 2 and settings.engine["max_num_seqs"] == 2  # flag wins
    assert settings.engine["block_size"] == 32  # from the file
    assert args.port == 9123
    assert settings.model == "pio:tiny" and args.served_model_name == ["pio:tiny"]
    assert settings.priority_classes["interactive"].level == 0  # pio settings apply too


def test_model_tag_overrides_config_model(tmp_path: Path) -> None:
    args, settings = parse_args(["--config", str(TINY_CONFIG), str(tmp_path)], None)
    assert settings.model == str(tmp_path) and args.served_model_name is None


def test_api_server_count_is_accepted_and_data_parallel_refused() -> None:
    args, _ = parse_args(["--config", str(TINY_CONFIG), "--api-server-count", "2"], None)
    assert args.api_server_count == 2
    args, _ = parse_args(["--config", str(TINY_CONFIG)], None)
    assert args.api_server_count == 1
    with pytest.raises(ConfigError, match="api-server-count 65: accepted 1..64"):
        parse_args(["--config", str(TINY_CONFIG), "--api-server-count", "65"], None)
    with pytest.raises(ConfigError, match="data-parallel-size 2.*serve-replicas"):
        parse_args(["--config", str(TINY_CONFIG), "--data-parallel-size", "2"], None)


def test_serve_replicas_policy_fits_the_replica_count() -> None:
    from pio_vllm.server.replicas import parse_args as replica_args

    args, rest = replica_args(["--replicas", "1", "--config", "x.yaml", "--max-num-seqs", "4"])
    assert args.policy == "round_robin" and rest == ["--config", "x.yaml", "--max-num-seqs", "4"]
    assert replica_args(["--replicas", "2"])[0].policy == "power_of_two"
    with pytest.raises(ConfigError, match="power_of_two needs --replicas 2"):
        replica_args(["--replicas", "1", "--policy", "power_of_two"])
    with pytest.raises(ConfigError, match="--port is the router's"):
        replica_args(["--replicas", "2", "--", "--port", "9"])


def test_serve_replicas_refuses_a_busy_port_by_number() -> None:
    import socket

    from pio_vllm.server.replicas import check_ports_free
    from pio_vllm.server.replicas import parse_args as replica_args

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        # the taken port is replica 1's (router on taken - 2, replica 0 on taken - 1)
        args, _ = replica_args(["--replicas", "2", "--port", str(taken - 2)])
        with pytest.raises(ConfigError, match=rf"\b{taken} already in use"):
            check_ports_free(args)
