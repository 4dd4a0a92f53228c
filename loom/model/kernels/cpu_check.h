// The native kernels read raw host pointers: a tensor on another device must be refused with a
// clear error rather than dereferenced.
#pragma once
#include <torch/extension.h>

#define LOOM_CHECK_CPU(t)                                                                                \
  TORCH_CHECK((t).device().is_cpu(), "loom's native CPU kernels take CPU tensors, but ", #t, " is on ", \
              (t).device(), "; use the torch or cuda attention backend")
