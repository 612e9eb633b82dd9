// Op registration for onp_fast: schemas (TORCH_LIBRARY), CPU and CUDA implementations
// (TORCH_LIBRARY_IMPL), and the pybind11 module that makes `import onp_fast._C` load them.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(onp_fast, m) {
}

TORCH_LIBRARY_IMPL(onp_fast, CPU, m) {
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(onp_fast, CUDA, m) {
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "onp_fast C++/CUDA ops (registered under torch.ops.onp_fast)";
#ifdef WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
}
