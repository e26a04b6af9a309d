"""Import megatron-core without compiling kernels rdpt never calls (run first by
pipeline/model/__init__.py, before any module here imports megatron).

megatron.core.jit sets `jit_fuser = torch.compile`, and megatron's fusion modules (bias + GeLU,
bias + SwiGLU, bias + dropout + add, ...) decorate their functions with it while the package
is imported. The first torch.compile call imports TorchDynamo and Inductor (with sympy): on a
2-core machine about 8-10 s of the 12-13 s `import megatron.core` takes, in every process (each
training rank, each evaluation). rdpt calls none of those functions: its layers are its own
(layers.py, attention.py) and every fusion flag is off in the TransformerConfig it builds. So
while megatron.core is imported torch.compile reads as the identity, and megatron's own switch
(`disable_jit_fuser`) is set before torch.compile is given back, for modules imported later.
torch.compile itself is untouched for everyone else (training's `compile` of the core
iteration, the decode loop). Later megatron-core releases read MEGATRON_DISABLE_JIT_FUSER=1 at
import for the same purpose; it is set too (unless already set), for them and for child
processes.
"""

from __future__ import annotations

import sys


def _identity(fn=None, *args, **kwargs):
    """torch.compile's call forms, compiling nothing: compile(fn) and compile(**options)(fn)."""
    return fn if fn is not None else (lambda f: f)


def import_megatron_core() -> None:
    """Import megatron.core (once) with its import-time torch.compile decorations skipped."""
    if "megatron.core" in sys.modules:
        return
    import os

    import torch

    os.environ.setdefault("MEGATRON_DISABLE_JIT_FUSER", "1")

    compile_ = torch.compile
    torch.compile = _identity
    try:
        import megatron.core
        from megatron.core import jit

        getattr(jit, "disable_jit_fuser", lambda: None)()
    finally:
        torch.compile = compile_
    del megatron
