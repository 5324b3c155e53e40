"""The parity rig: proof that a build computes what the reference computes.

``reference`` (transformers on PyTorch CPU) and ``report`` (the host parity
report), ``checkpoint`` (random-weight test checkpoints in the Hugging Face
layout), ``static_checks`` (device-source checks) and ``emulators/`` (device
code on emulated devices: capture, replay, whole-model runs).  It depends on
compile/ and bindings/; nothing below it imports it (docs/design.md).
"""
