"""The simulator (pio_vllm/sim/): vLLM's own scheduler and pio's own admission on virtual time.
No engine process starts; the tiny checkpoint's config is what vLLM resolves. Policy
regressions here run in seconds and give the same numbers every run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pio_vllm.errors import ConfigError
from pio_vllm.settings import PioSettings
from pio_vllm.sim.cluster import simulate
from pio_vllm.sim.profile import SimProfile, load_profile
from pio_vllm.sim.trace import TraceRow, format_trace, parse_trace
from tests.helpers import TINY_CONFIG

PROFILE = SimProfile("test", "test", base_s=0.01, per_token_s=0.00002,
                     per_vision_token_s=0.0007, prep_base_s=0.004,
                     prep_per_vision_token_s=0.00002)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[PioSettings, str]:
    return PioSettings.load(TINY_CONFIG), str(tiny_model_dir)


def flood() -> list[TraceRow]:
    """Priority inversion: 24 batch requests of 256 tokens at once, then urgent ones."""
    rows = [TraceRow(0.0, "batch", 30, 256, 320, 240) for _ in range(24)]
    rows += [TraceRow(1.0 + 0.1 * i, "interactive", 20, 16, 224, 224) for i in range(4)]
    return rows


def test_a_trace_round_trips_and_bad_rows_name_themselves() -> None:
    rows = [TraceRow(0.5, "batch", 12, 32, 0, 0), TraceRow(0.25, "interactive", 8, 4, 640, 480)]
    parsed = parse_trace(format_trace(rows), classes=["batch", "interactive"])
    assert parsed == sorted(rows, key=lambda r: r.arrival_s)
    with pytest.raises(ConfigError, match="columns"):
        parse_trace("arrival,class\n0,batch\n")
    with pytest.raises(ConfigError, match="line 2.*image_w,image_h both 0"):
        parse_trace(format_trace([TraceRow(0, "batch", 1, 1, 64, 0)]))
    with pytest.raises(ConfigError, match="class 'vip' is not configured"):
        parse_trace(format_trace([TraceRow(0, "vip", 1, 1)]), classes=["batch"])


def test_urgent_requests_wait_less_with_pio_than_with_plain(tiny: tuple[PioSettings, str]
                                                            ) -> None:
    settings, model = tiny
    results = {side: simulate(settings, model, PROFILE, flood(), side=side, seed=3)
               for side in ("plain", "pio")}
    urgent = {side: max(o.ttft_s for o in r.outcomes if o.priority_class == "interactive")
              for side, r in results.items()}
    assert all(o.ok for r in results.values() for o in r.outcomes)
    # plain vLLM never preempts a running request: the urgent ones wait for a 256-token
    # batch request to end; pio preempts one inside vLLM's scheduler (its own patch)
    assert urgent["pio"] * 5 < urgent["plain"], urgent


def test_the_same_inputs_give_the_same_outcomes(tiny: tuple[PioSettings, str]) -> None:
    settings, model = tiny
    noisy = SimProfile(**{**PROFILE.__dict__, "residuals": (0.8, 1.0, 1.3)})
    runs = [simulate(settings, model, noisy, flood(), side="pio", seed=7) for _ in range(2)]
    assert [vars(o) for o in runs[0].outcomes] == [vars(o) for o in runs[1].outcomes]
    other = simulate(settings, model, noisy, flood(), side="pio", seed=8)
    assert [o.ttft_s for o in other.outcomes] != [o.ttft_s for o in runs[0].outcomes]


def test_a_refusal_is_retried_on_another_replica(tiny: tuple[PioSettings, str]) -> None:
    settings, model = tiny
    small = settings.model_copy(update={"priority_classes": {
        **settings.priority_classes,
        "batch": settings.priority_classes["batch"].model_copy(update={"max_queue_len": 1})}})
    rows = [TraceRow(0.0, "batch", 30, 64) for _ in range(24)]
    one = simulate(small, model, PROFILE, rows, side="pio", replicas=1, seed=1)
    two = simulate(small, model, PROFILE, rows, side="pio", replicas=2, seed=1)
    refused_one = sum(o.refused for o in one.outcomes)
    assert refused_one > 0  # capacity 8 + 2, a queue of 1: the rest is refused
    assert sum(o.refused for o in two.outcomes) < refused_one  # retried on the other


def test_simulate_cli_writes_both_sides_and_the_fewest_replicas(
        tiny: tuple[PioSettings, str], tmp_path: Path) -> None:
    from pio_vllm.sim.cli import main

    trace = tmp_path / "t.csv"
    trace.write_text(format_trace(flood()))
    out = tmp_path / "sim.json"
    assert main(["--config", str(TINY_CONFIG), "--trace", str(trace), "--profile",
                 "tiny-cpu", "--model", tiny[1], "--json-out", str(out)]) == 0
    doc = json.loads(out.read_text())
    for side in ("plain", "pio"):
        s = doc["sides"][side]
        assert {"goodput_req_s", "ttft_p50_s", "ttft_p99_s", "served", "refused",
                "classes"} <= set(s)
        assert s["classes"]["interactive"]["requests"] == 4
    sweep = tmp_path / "sweep.json"
    assert main(["--config", str(TINY_CONFIG), "--trace", str(trace), "--profile",
                 "tiny-cpu", "--model", tiny[1], "--replicas", "1..2", "--sides", "pio",
                 "--goodput-target", "0.5", "--json-out", str(sweep)]) == 0
    doc = json.loads(sweep.read_text())
    assert [r["replicas"] for r in doc["runs"]] == [1, 2]
    assert doc["fewest_replicas"]["pio"] in (1, 2)
    with pytest.raises(ConfigError, match="--without \\['magic'\\]"):
        main(["--config", str(TINY_CONFIG), "--trace", str(trace), "--without", "magic",
              "--model", tiny[1], "--json-out", str(tmp_path / "x.json")])


def test_calibration_recovers_the_terms_it_was_given() -> None:
    from benchmarks.calibrate import fit_profile

    rng = np.random.default_rng(0)
    samples = []
    for _ in range(300):
        tokens = int(rng.integers(1, 3000))
        image = int(rng.choice([0, 64, 300, 1344]))
        seconds = 0.01 + 2e-5 * tokens + 5e-4 * image + 2e-7 * image * image
        samples.append((tokens, image, 4, seconds * rng.uniform(0.97, 1.03), image * image))
    profile, r2 = fit_profile("t", samples, [(v, 0.003 + 1e-5 * v) for v in (0, 64, 300, 1344)],
                              "cpu")
    assert r2 > 0.99
    assert profile.base_s == pytest.approx(0.01, rel=0.2)
    assert profile.per_token_s == pytest.approx(2e-5, rel=0.1)
    assert profile.per_vision_token_sq_s == pytest.approx(2e-7, rel=0.2)
    assert profile.prep_per_vision_token_s == pytest.approx(1e-5, rel=0.05)
    assert 0.95 < profile.residuals[50] < 1.05 and len(profile.residuals) == 101


def test_shipped_profiles_load_and_the_derived_one_says_so() -> None:
    h100 = load_profile("qwen3-vl-2b-h100")
    assert h100.source.startswith("derived") and "not fitted" in h100.source
    # a unique 1344x1008 image alone, as the H100 anchor measured it: 162 ms to first token
    alone = h100.prep_s(1344) + h100.predict_s(1364, [1344])
    assert alone == pytest.approx(0.162, rel=0.15)
    with pytest.raises(ConfigError, match="profile 'nope' not found"):
        load_profile("nope")


def test_fidelity_compares_each_figure_with_its_tolerance() -> None:
    from benchmarks.sim_fidelity import compare

    real = {"plain": {"goodput": 1.0, "ttft_p50_s": 2.0, "ttft_p99_s": 10.0},
            "pio": {"goodput": 2.0, "ttft_p50_s": 0.5, "ttft_p99_s": 2.0}}
    sim = {"plain": {"goodput": 1.1, "ttft_p50_s": 2.5, "ttft_p99_s": 12.0},
           "pio": {"goodput": 0.01, "ttft_p50_s": 0.55, "ttft_p99_s": 3.0}}
    rows = {(r["side"], r["metric"]): r for r in compare("w", real, sim, offered_per_s=10.0)}
    assert rows[("plain", "goodput")]["within"]  # 10% off, 15% allowed
    assert not rows[("plain", "ttft_p50_s")]["within"]  # 25% off, 20% allowed
    assert rows[("plain", "ttft_p99_s")]["within"]  # 20% off, 30% allowed
    assert not rows[("pio", "ttft_p99_s")]["within"]  # 50% off
    assert not rows[("pio/plain", "goodput ratio side of 1")]["within"]  # 2x real, 0.01x sim
    near_zero = compare("w", {**real, "plain": {**real["plain"], "goodput": 0.1}},
                        {**sim, "plain": {**sim["plain"], "goodput": 0.25}}, 10.0)
    [row] = [r for r in near_zero if (r["side"], r["metric"]) == ("plain", "goodput")]
    assert row["within"] and row["target"] == "within 2% of offered"  # 0.15 off of 10/s
