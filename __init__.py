"""qwen35-mobile: Qwen3.5 compiled by Apache TVM for phones and browsers.

Pipeline: checkpoint -> config (compile.config) -> Relax model (compile.model)
-> passes and per-target build (compile.pipeline, targets) -> artifact
(compile.artifact) -> bindings (bindings.model) -> parity report (parity.report).
"""

__version__ = "0.1.0"


def __getattr__(name):  # lazy: importing the package must not import TVM
    if name == "Model":
        from .bindings.model import Model

        return Model
    raise AttributeError(name)
