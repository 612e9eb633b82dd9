"""Builds onp_fast._C from csrc/build.json (the one source list, shared with CMakeLists.txt).

CUDA sources join the build when torch has CUDA and CUDA_HOME is set.
ONP_FAST_FORCE_CUDA=1 forces them in, ONP_FAST_NO_CUDA=1 leaves them out.
Build with `pip install --no-build-isolation -e .` (never let pip build against an isolated torch).
"""
import json
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
SPEC = json.loads((ROOT / "csrc" / "build.json").read_text())


def _want_cuda() -> bool:
    if os.environ.get("ONP_FAST_NO_CUDA") == "1":
        return False
    if os.environ.get("ONP_FAST_FORCE_CUDA") == "1":
        return True
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


def _extensions():
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:  # pragma: no cover - environment problem
        raise SystemExit(
            "onp-fast needs torch installed before it is built: "
            "pip install torch==2.13.0, then pip install --no-build-isolation -e ."
        ) from exc
    cuda = _want_cuda()
    sources = list(SPEC["sources"]) + (list(SPEC["cuda_sources"]) if cuda else [])
    kwargs = dict(
        name=SPEC["extension"],
        sources=sources,
        include_dirs=[str(ROOT / d) for d in SPEC["include_dirs"]],
    )
    if cuda:
        ext = CUDAExtension(
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": SPEC["cxx_flags"], "nvcc": SPEC["nvcc_flags"]},
            **kwargs,
        )
    else:
        ext = CppExtension(extra_compile_args={"cxx": SPEC["cxx_flags"]}, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
