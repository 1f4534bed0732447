"""Engines: what draws candidates (a sampler) and what reads rewards (a scorer), behind one contract.

`contract` is what the service sees; `hf` is the transformers engine, `vllm` the vLLM one.
"""
