"""VisionZip inside vLLM: a `vllm.general_plugins` plugin (see `vzedge.vllm.plugin`)."""
