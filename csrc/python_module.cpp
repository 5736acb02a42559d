// The Python module `unilora_kernels._C`. Importing it loads this library, whose static
// initialisers register the unilora_C ops (ops.cpp); it also reports what was built. Only the
// setup.py build compiles this file: the CMake build is a plain library for
// torch.ops.load_library, with no Python dependency.
#include <Python.h>
#include <torch/version.h>

#include "cpu_simd.h"
#include "decode_limits.h"

#ifndef UNILORA_CUDA_ARCHS
#define UNILORA_CUDA_ARCHS ""
#endif

namespace {

PyObject* build_metadata(PyObject*, PyObject*) {
#ifdef UNILORA_WITH_CUDA
  const bool cuda = true;
#else
  const bool cuda = false;
#endif
#ifdef _OPENMP
  const bool openmp = true;
#else
  const bool openmp = false;
#endif
  // "8.0;9.0" -> ["8.0", "9.0"]
  PyObject* sep = PyUnicode_FromString(";");
  PyObject* archs_str = PyUnicode_FromString(cuda ? UNILORA_CUDA_ARCHS : "");
  PyObject* archs = PyUnicode_GetLength(archs_str) ? PyUnicode_Split(archs_str, sep, -1) : PyList_New(0);
  Py_DECREF(sep);
  Py_DECREF(archs_str);
  if (archs == nullptr) return nullptr;
  // cpu_simd: the SIMD CPU kernels run here (this CPU has AVX2+FMA, UNILORA_CPU_SIMD is not 0);
  // cpu_simd_isa: the widest ISA they use ("avx512", "avx2" or "none").
  const bool simd = unilora::simd::available();
  const char* isa = unilora::simd::avx512() ? "avx512" : (simd ? "avx2" : "none");
  // decode_max_m / decode_max_r: the decode limits compiled in (policy.py's at build time);
  // cpu_small_m: the CPU decode paths' rows, up to which unilora_C::linear returns h on CPU.
  PyObject* out = Py_BuildValue("{s:O,s:N,s:O,s:O,s:s,s:s,s:s,s:L,s:L,s:L}", "cuda", cuda ? Py_True : Py_False,
                                "archs", archs, "openmp", openmp ? Py_True : Py_False, "cpu_simd",
                                simd ? Py_True : Py_False, "cpu_simd_isa", isa, "torch_version", TORCH_VERSION, "ops",
                                "unilora_C", "decode_max_m", static_cast<long long>(unilora::kDecodeMaxM),
                                "decode_max_r", static_cast<long long>(unilora::kDecodeMaxR), "cpu_small_m",
                                static_cast<long long>(unilora::cpu::kSmallM));
  return out;
}

PyMethodDef methods[] = {
    {"build_metadata", build_metadata, METH_NOARGS,
     "What this extension was built with: CUDA kernels and their archs, OpenMP, SIMD, torch version, decode limits."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "Uni-LoRA compiled kernels (ops in torch.ops.unilora_C)",
                          -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
