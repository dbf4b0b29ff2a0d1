"""Seeded workload generator: the requests both sides of an A/B run replay, as JSONL.

    python -m benchmarks.workload --arrival poisson --rate 4 --n 100 --out wl.jsonl

Arrivals: `burst` (all at t=0), `poisson` (rate r per second) or `closed` (concurrency c:
each request starts when one of c slots frees; arrival offsets are then ignored). Each
request draws a priority class by weight, a number of images and their sizes, a prompt
length in words and an output length (fixed with ignore_eos). The same spec and seed give
the same requests, byte for byte.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.harness import BenchRequest, write_workload

WORDS = ("the", "red", "car", "blue", "sky", "cat", "dog", "tree", "house", "street", "light",
         "water", "road", "window", "city", "river", "green", "stone", "bridge", "cloud")

# Levels of pio's default classes (lower is served first, as in vLLM).
DEFAULT_LEVELS = {"interactive": 0, "standard": 1, "batch": 2}


@dataclass(frozen=True)
class WorkloadSpec:
    """What to generate. Sizes are (width, height); weights need not sum to 1."""

    n: int = 32
    seed: int = 0
    arrival: str = "burst"  # burst | poisson | closed
    rate_per_s: float = 4.0  # poisson
    concurrency: int = 8  # closed loop
    classes: dict[str, float] = field(default_factory=lambda: {"standard": 1.0})
    levels: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_LEVELS))
    images_per_request: dict[int, float] = field(default_factory=lambda: {0: 1.0})
    image_sizes: dict[str, float] = field(default_factory=lambda: {"448x336": 1.0})
    prompt_words: tuple[int, int] = (8, 16)
    output_tokens: tuple[int, int] = (64, 64)

    def __post_init__(self) -> None:
        if self.arrival not in ("burst", "poisson", "closed"):
            raise ValueError(f"arrival {self.arrival!r}; accepted: burst, poisson, closed")
        if self.n <= 0:
            raise ValueError(f"n must be positive, got {self.n}")
        if self.arrival == "poisson" and self.rate_per_s <= 0:
            raise ValueError(f"rate_per_s must be positive, got {self.rate_per_s}")
        unknown = sorted(set(self.classes) - set(self.levels))
        if unknown:
            raise ValueError(f"classes {unknown} have no level in {self.levels}")


def _pick(rng: random.Random, weights: dict[str, float] | dict[int, float]) -> object:
    keys = list(weights)
    return rng.choices(keys, weights=[weights[k] for k in keys])[0]  # type: ignore[index]


def generate(spec: WorkloadSpec) -> list[BenchRequest]:
    rng = random.Random(spec.seed)
    t = 0.0
    out = []
    for i in range(spec.n):
        if spec.arrival == "poisson":
            t += rng.expovariate(spec.rate_per_s)
        cls = str(_pick(rng, spec.classes))
        n_images = int(_pick(rng, spec.images_per_request))  # type: ignore[call-overload]
        images = []
        for _ in range(n_images):
            w, h = (int(x) for x in str(_pick(rng, spec.image_sizes)).split("x"))
            images.append((w, h, rng.randrange(1 << 30)))
        words = rng.randint(*spec.prompt_words)
        text = "describe " + " ".join(rng.choice(WORDS) for _ in range(words))
        out.append(BenchRequest(
            request_id=f"req-{i:05d}", priority_class=cls, level=spec.levels[cls], text=text,
            max_tokens=rng.randint(*spec.output_tokens),
            arrival_s=round(t, 4) if spec.arrival == "poisson" else 0.0,
            images=tuple(images)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="write a seeded benchmark workload as JSONL")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arrival", default="burst", choices=["burst", "poisson", "closed"])
    ap.add_argument("--rate", type=float, default=4.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--classes", default='{"standard": 1}', help="JSON {class: weight}")
    ap.add_argument("--images", default='{"0": 1}', help="JSON {images per request: weight}")
    ap.add_argument("--sizes", default='{"448x336": 1}', help="JSON {WxH: weight}")
    ap.add_argument("--output-tokens", default="64,64", help="min,max")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    lo, hi = (int(x) for x in a.output_tokens.split(","))
    spec = WorkloadSpec(
        n=a.n, seed=a.seed, arrival=a.arrival, rate_per_s=a.rate, concurrency=a.concurrency,
        classes=json.loads(a.classes),
        images_per_request={int(k): v for k, v in json.loads(a.images).items()},
        image_sizes=json.loads(a.sizes), output_tokens=(lo, hi))
    write_workload(generate(spec), a.out)
    a.out.with_suffix(".spec.json").write_text(json.dumps(asdict(spec), indent=1))
    print(f"wrote {spec.n} requests to {a.out}")


if __name__ == "__main__":
    main()
