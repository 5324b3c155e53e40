"""The host twin of a GPU build: the same kernels, run on this machine's CPU.

The parity emulators compare every device kernel with its twin on the
tensors of a real run.  The twin is the GPU build's Relax graph (the same
legalization and fusion passes, so the same kernel names and arguments) with

* the hand-written GPU kernels (Gated DeltaNet, causal conv) instantiated with
  serial loops instead of thread bindings (``emulate=True``: the very same
  bodies, see compile/kernels/gpu_gated_delta_rule.py);
* TVM's CPU attention kernels in the paged KV cache, which take the same
  arguments as its GPU ones (the cache calls both the same way) and are named
  like them with a ``_cpu`` suffix;
* the other kernels (legalized ops) compiled unscheduled-then-CPU-scheduled
  for ``llvm`` instead of dlight-scheduled for the GPU.

A twin is an ordinary host library: a preset with ``graph_of`` set
(targets/__init__.py) builds one through the usual compile path.
"""

from __future__ import annotations

import tvm

from ..targets import TargetPreset, get_target


def twin_pipeline(twin: TargetPreset) -> tvm.transform.Pass:
    """GPU graph passes under the GPU target, then CPU schedules and lowering."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu_passes

    from .schedule_cpu import schedule_for_cpu_pass
    from .schedule_gpu import gpu_graph_passes

    gpu_target = get_target(twin.graph_of).tvm_target()
    host = twin.tvm_target()

    @tvm.transform.module_pass(opt_level=0, name="HostTwinPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with gpu_target:
            mod = tvm.transform.Sequential(gpu_graph_passes(gpu_target))(mod)
        with host:
            return tvm.transform.Sequential(
                [schedule_for_cpu_pass(host)]
                + cpu_passes.dataflow_lower_passes(host)
                + cpu_passes.finalize_passes(host)
            )(mod)

    return _pipeline


def device_kernels(mod: tvm.IRModule, preset: TargetPreset) -> dict[str, tvm.tirx.PrimFunc]:
    """The scheduled TIR functions of ``preset``'s build of ``mod`` (an exported
    Relax module), by name: what the device runs, before codegen."""
    from .schedule_gpu import gpu_kernel_passes

    target = preset.kernel_target()
    with target:
        mod = tvm.transform.Sequential(gpu_kernel_passes(target))(mod)
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
