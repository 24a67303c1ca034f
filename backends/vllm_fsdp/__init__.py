"""The real backend (issue 8): vLLM rollouts and teacher scoring, an FSDP2 learner, weight sync over
torch.distributed. vllm is imported lazily, only inside the modules that need it; everything else runs on CPU
with the gloo backend."""
