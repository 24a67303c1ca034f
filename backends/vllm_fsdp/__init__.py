"""The real backend (issue 8): vLLM rollouts and teacher scoring, an FSDP2 learner (weights travel by
backends/weight_sync.py, shared with the Ray loop). vllm is imported lazily, only inside the modules that need
it; everything else runs on CPU with the gloo backend. Nothing here imports a toy role or a run loop; parts.py
is the bridge that builds a run's roles (tests/test_boundaries.py)."""
