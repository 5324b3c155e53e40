"""Relax model -> passes -> library, for one target preset."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from ..targets import TargetPreset
from . import quantization
from .config import ImageProcessorConfig, Qwen35Config
from .quantization import Quantization, QuantizeMap

TEXT = "text"  # the text decoder's entry point: embed, prefill, decode, the state constructors
VISION = "vision"  # the vision tower's entry point: image_embed
WEBLLM = "webllm"  # what WebLLM calls besides the decoder: _metadata and its sampler

Param = tuple[str, tuple[int, ...], str]  # name, shape, dtype


@dataclass
class EntryPoint:
    """One model function of a library, e.g. the text decoder (:data:`TEXT`)
    or, later, the vision tower's ``image_embed``: the functions it exports and
    the parameters they take (packed, in this order)."""

    functions: list[str]
    params: list[Param]


@dataclass
class Exported:
    mod: object  # tvm.IRModule with the functions of every entry point
    entry_points: dict[str, EntryPoint]  # name -> its functions and parameters; TEXT first
    quant: Quantization  # the registry entry (compile/quantization.py)
    quantize_map: QuantizeMap | None = None  # what quantizing the model did (q4 formats)

    @property
    def dtype(self) -> str:
        """The model dtype: fp16 builds get the preset's fp16_mattr."""
        return self.quant.model_dtype

    @property
    def functions(self) -> list[str]:
        """Every exported function, entry point after entry point (the
        manifest's ``exported_functions``)."""
        return [f for entry in self.entry_points.values() for f in entry.functions]

    @property
    def params(self) -> list[Param]:
        """The library's parameters (tensor cache order): every entry point's,
        in order; one that several entry points take is listed once."""
        out: dict[str, Param] = {}
        for entry in self.entry_points.values():
            for param in entry.params:
                out.setdefault(param[0], param)
        return list(out.values())

    def expected(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {name: (shape, dtype) for name, shape, dtype in self.params}

    def add_entry_point(self, name: str, entry: EntryPoint, mod=None) -> None:
        """Add another model function (the vision tower's ``image_embed``)
        next to the ones there, leaving theirs as they are.  ``mod`` is its
        own exported IRModule (None when this export has no module, as from
        :func:`parameters`), whose functions join :attr:`mod`.  A name already
        taken (entry point, function, global of the module) or a shared
        parameter of another shape or dtype is a ValueError."""
        where = f"entry point '{name}'"
        if name in self.entry_points:
            raise ValueError(f"{where} is already exported")
        taken = set(self.functions).intersection(entry.functions)
        if taken:
            raise ValueError(f"{where}: functions {sorted(taken)} are already exported")
        known = {p[0]: p for p in self.params}
        clash = [p for p in entry.params if p[0] in known and known[p[0]] != p]
        if clash:
            raise ValueError(f"{where}: parameter {clash[0]} differs from {known[clash[0][0]]}")
        if (mod is None) != (self.mod is None):
            raise ValueError(f"{where}: a module joins a module, None a parameters-only export")
        if mod is not None:
            ours = {gv.name_hint for gv in self.mod.get_global_vars()}
            both = sorted(ours.intersection(gv.name_hint for gv in mod.get_global_vars()))
            if both:
                raise ValueError(f"{where}: the module defines {both}, which are already defined")
            self.mod.update(mod)
        self.entry_points[name] = entry


def _shapes(named) -> list[tuple[str, tuple[int, ...], str]]:
    return [(name, tuple(int(d) for d in p.shape), p.dtype) for name, p in named]


def _model(config: Qwen35Config, quant: Quantization, target, kernels, *, compute: bool = True):
    """The text decoder's ``nn.Module`` (KV cache for ``target``, DeltaNet
    ``kernels``), built once and quantized as the registry
    says; returns ``(model, quantize map or None)``.  Its parameters must be
    what the registry stores for the unquantized model's (names, shapes, dtypes,
    order), so that conversion, sizes and the parity reference, which read the
    registry, agree with the library.  ``compute=False``: for the parameter list
    alone (the kernels a quantization needs are not asked for)."""
    from .model.qwen35 import Qwen35LM

    model = Qwen35LM(config, quant.model_dtype, target, kernels=kernels)
    originals = _shapes(model.named_parameters())
    model, qmap = quant.quantize(model, kernels=kernels if compute else None)
    want = [stored for name, shape, _ in originals for stored in quant.stored(name, shape)]
    got = _shapes(model.named_parameters())
    if got != want:
        bad = next((g, w) for g, w in itertools.zip_longest(got, want) if g != w)
        raise RuntimeError(
            f"{quant.name}: the model's parameter {bad[0]} is not what compile/quantization.py "
            f"stores ({bad[1]}): declare its dtype there (FP32_PARAMS) or change the model"
        )
    return model, qmap


def _vision_model(
    config: Qwen35Config, quant: Quantization, processor: ImageProcessorConfig, kernels
):
    """The vision tower's ``nn.Module`` (``image_embed``, attention from
    ``kernels``), in the model dtype: the registry keeps its parameters
    unquantized (compile/quantization.py)."""
    from .model.vision import VisionModel

    model = VisionModel(config.vision, processor, quant.model_dtype, kernels)
    got = _shapes(model.named_parameters())
    want = [s for name, shape, _ in got for s in quant.stored(name, shape)]
    if got != want:
        bad = next((g, w) for g, w in itertools.zip_longest(got, want) if g != w)
        raise RuntimeError(
            f"{quant.name}: the vision tower's parameter {bad[0]} is not what "
            f"compile/quantization.py stores ({bad[1]})"
        )
    return model


def parameters(config: Qwen35Config, quant: str, *, vision: bool = True) -> Exported:
    """The parameter list (and quantization map) without exporting the Relax
    module: cheap, for sizes and weight conversion alone.  ``vision``: with the
    tower's parameters when the config has one."""
    from ..targets import get_target
    from .kernels import kernel_set_for

    q = quantization.get(quant)
    host = get_target("host")
    model, qmap = _model(config, q, host.tvm_target(), kernel_set_for(host), compute=False)
    exported = Exported(None, {TEXT: EntryPoint([], _shapes(model.named_parameters()))}, q, qmap)
    if vision and config.vision is not None:
        tower = _vision_model(config, q, ImageProcessorConfig(), kernel_set_for(host))
        exported.add_entry_point(VISION, EntryPoint([], _shapes(tower.named_parameters())))
    return exported


def export(
    config: Qwen35Config,
    quant: str,
    preset: TargetPreset,
    *,
    processor: ImageProcessorConfig | None = None,
    prefill_chunk: int = 2048,
) -> Exported:
    """The Relax module of the text decoder, with its parameter list, and of
    the vision tower (``image_embed``) when ``processor`` is given (the config
    must have a tower); each model is built once.  A preset with ``webllm``
    adds WebLLM's functions (compile/model/webllm.py; ``prefill_chunk`` goes into
    its metadata)."""
    from ..targets import get_target

    q = quantization.get(quant)
    dtype = q.model_dtype
    target = preset.kernel_target(dtype)
    # The DeltaNet kernels of this preset; a host twin's are its GPU preset's, on the CPU.
    from .kernels import kernel_set_for

    kernels = kernel_set_for(preset, dtype)
    model, qmap = _model(config, q, target, kernels)
    # WebLLM's decoder functions; a host twin exports them too, so that its kernels are
    # named as its GPU preset's (the kernel replay pairs kernels by name)
    twin_of = get_target(preset.graph_of) if preset.graph_of else None
    webllm = preset.webllm or bool(twin_of and twin_of.webllm)
    spec = model.get_default_spec(webllm=webllm)
    mod, named = model.export_tvm(spec=spec)
    if preset.is_gpu:
        from .kernels.gpu_gated_delta_rule import max_threads_for_target
        from .kernels.merge_state import replace_merge_state

        # TVM's GPU attention-state merge races between threads (kernels/merge_state.py).
        mod = replace_merge_state(
            mod, config.num_attention_heads, config.head_dim, dtype, max_threads_for_target(target)
        )
    elif not preset.graph_of:  # a CPU build (a host twin keeps TVM's kernels, as its GPU)
        from .kernels.cpu_prefill_attention import replace_paged_decode, replace_ragged_prefill
        from .schedule_cpu import cpu_target, vector_bits

        # TVM's CPU ragged prefill and paged decode attention are serial and scalar
        # (kernels/cpu_prefill_attention.py).
        lanes = min(vector_bits(cpu_target(target)) // 32, config.head_dim)
        heads = (config.num_attention_heads, config.num_key_value_heads, config.head_dim, dtype)
        lanes = lanes if config.head_dim % lanes == 0 else 1
        mod = replace_ragged_prefill(mod, *heads, lanes)
        mod = replace_paged_decode(mod, *heads, lanes)
    functions = list(spec.method_names)
    if webllm:  # WebLLM's name for the cache constructor: ours
        from .model.webllm import alias

        mod = alias(mod, "create_tir_paged_kv_cache", "create_paged_kv_cache")
        functions.append("create_tir_paged_kv_cache")
    exported = Exported(mod, {TEXT: EntryPoint(functions, _shapes(named))}, q, qmap)
    if preset.webllm:
        from .model.webllm import FUNCTIONS, webllm_module

        text = exported.entry_points[TEXT].params
        wmod = webllm_module(config.vocab_size, text, prefill_chunk)
        exported.add_entry_point(WEBLLM, EntryPoint(list(FUNCTIONS), []), wmod)
    if processor is not None:
        if config.vision is None:
            raise ValueError("a vision entry point needs a config with a vision tower")
        tower = _vision_model(config, q, processor, kernels)
        vspec = tower.get_default_spec()
        vmod, vnamed = tower.export_tvm(spec=vspec)
        exported.add_entry_point(
            VISION, EntryPoint(list(vspec.method_names), _shapes(vnamed)), vmod
        )
    return exported


def build(
    exported: Exported, preset: TargetPreset, path: Path, *, dump_ir: Path | None = None
) -> None:
    """Optimise, schedule for the target, compile and export the library.

    The preset decides everything: the pipeline (CPU schedules for ``llvm``,
    :func:`.schedule_gpu.gpu_pipeline` otherwise) and the export by the output's
    kind: ``.so`` a shared library, ``.tar`` a static system library (object
    files ``lib0.o`` host code + ``<prefix>devc.o`` device code, functions
    registered under the preset's ``system_lib_prefix``) that an app links.
    """
    import tvm

    target = preset.tvm_target(exported.dtype)
    mod = exported.mod
    static = str(path).endswith(".tar")
    if static:
        mod = mod.with_attr("system_lib_prefix", preset.system_lib_prefix or "")
    if preset.graph_of:
        from .twin import twin_pipeline

        relax_pipeline = twin_pipeline(preset)
    elif preset.is_gpu:
        from .schedule_gpu import gpu_pipeline

        # Scheduled as the shipping preset's kernels (``kernels_of``), compiled with this one's host.
        relax_pipeline = gpu_pipeline(preset.kernel_target(exported.dtype))
    else:
        from .schedule_cpu import cpu_pipeline

        relax_pipeline = cpu_pipeline(target)
    from .reproducible import canonical_shape_funcs, deterministic_tar

    # The same inputs give the same bytes (compile/reproducible.py): shape functions in slot order.
    relax_pipeline = tvm.transform.Sequential([relax_pipeline, canonical_shape_funcs()])
    # system_lib=False: the module attribute set above already makes a system
    # library; TVM 0.27's auto-detection (on for wasm hosts) reads that attribute
    # back through IRModule.get_attr, which fails for strings of up to 7 bytes
    # ("Cannot convert from type `ffi.SmallStr`"), e.g. "qwen35_".
    if dump_ir is None:
        executable = tvm.relax.build(mod, target, relax_pipeline=relax_pipeline, system_lib=False)
    else:  # compile --dump-ir DIR: the IR after each stage (compile/dump_ir.py)
        from .dump_ir import DumpStages, write_ir

        write_ir(Path(dump_ir), 0, "export", mod)
        current = tvm.transform.PassContext.current()
        with tvm.transform.PassContext(
            opt_level=current.opt_level,
            config=dict(current.config),
            instruments=[DumpStages(Path(dump_ir))],
        ):
            executable = tvm.relax.build(
                mod, target, relax_pipeline=relax_pipeline, system_lib=False
            )
    if static:
        executable.export_library(str(path), fcompile=deterministic_tar)
    elif preset.linker:  # a .so for another machine: link with its cross compiler
        from tvm.support import cc

        executable.export_library(str(path), fcompile=cc.cross_compiler(preset.linker))
    else:
        executable.export_library(str(path))
