"""pio's simulator: pio's own admission code against vLLM's own scheduler, with the model's
forward pass replaced by a step-time profile (one process, virtual time, no model run).

- `trace.py`: the requests (a CSV of `arrival_s,class,prompt_tokens,output_tokens,image_w,
  image_h`, or the bench scenarios' workloads).
- `profile.py`: engine step time and frontend preparation time per unit of work, fitted
  from a real engine's step records (`pio-vllm bench calibrate`) or derived from anchors.
- `engine.py`: a replica's engine: vLLM's real v1 `Scheduler` (pio's scheduler class, as the
  EngineCore builds it from `scheduler_cls`: priority preemption, batch limits) stepped
  with fabricated `ModelRunnerOutput`s, each step taking the profile's time.
- `frontend.py`: a replica's frontend: pio's `AdmissionController` (the production class)
  or plain vLLM's arrival-order frontend, with the one rendering thread in front of the
  engine.
- `cluster.py`: replicas behind a router policy, refusals retried elsewhere as vllm-router
  does; the run on an asyncio loop whose clock is virtual (`looptime`), so the controller's
  futures, timeouts and timers run unchanged, in virtual seconds.

Everything is ordered deterministically from one seeded RNG: the same inputs give the same
result, byte for byte.
"""
