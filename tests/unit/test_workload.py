"""The seeded workload generator: same spec, same requests; arrival modes; JSONL round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.harness import read_workload, write_workload
from benchmarks.workload import WorkloadSpec, generate


def spec(**kw: object) -> WorkloadSpec:
    base: dict[str, object] = dict(
        n=50, seed=7, arrival="poisson", rate_per_s=5.0,
        classes={"interactive": 1, "batch": 3}, images_per_request={0: 1, 1: 2, 2: 1},
        image_sizes={"320x240": 1, "1344x1008": 1}, output_tokens=(16, 128))
    base.update(kw)
    return WorkloadSpec(**base)  # type: ignore[arg-type]


def test_same_spec_same_requests_and_jsonl_round_trip(tmp_path: Path) -> None:
    a, b = generate(spec()), generate(spec())
    assert a == b
    assert generate(spec(seed=8)) != a
    write_workload(a, tmp_path / "a.jsonl")
    write_workload(b, tmp_path / "b.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert read_workload(tmp_path / "a.jsonl") == a


def test_distributions_and_arrivals() -> None:
    work = generate(spec(n=2000))
    batch = sum(r.priority_class == "batch" for r in work) / len(work)
    assert 0.70 < batch < 0.80  # weight 3 of 4
    assert {len(r.images) for r in work} == {0, 1, 2}
    assert all(16 <= r.max_tokens <= 128 for r in work)
    assert all({(w, h) for w, h, _ in r.images} <= {(320, 240), (1344, 1008)} for r in work)
    arrivals = [r.arrival_s for r in work]
    assert arrivals == sorted(arrivals)
    rate = len(work) / arrivals[-1]
    assert 4.5 < rate < 5.5  # Poisson at 5 / s
    assert {r.arrival_s for r in generate(spec(arrival="burst"))} == {0.0}
    assert {r.level for r in work if r.priority_class == "interactive"} == {0}


def test_bad_specs_are_refused() -> None:
    with pytest.raises(ValueError, match="arrival 'sometimes'"):
        spec(arrival="sometimes")
    with pytest.raises(ValueError, match="have no level"):
        spec(classes={"vip": 1})
