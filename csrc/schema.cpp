// The mpq op schema, defined once for every runtime (Python, AOTInductor,
// C++-only). Fake kernels and autograd live in the Python module named here;
// the dispatcher imports it when a fake kernel is first needed.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(mpq, m) {
  m.set_python_module("mpq_ops.ops");
  m.def(
      "matmul(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int w_bit, "
      "int group_size, Tensor? perm=None, Tensor? bias=None) -> Tensor");
  m.def(
      "dequantize(Tensor qweight, Tensor scales, Tensor zeros, int w_bit, "
      "int group_size) -> Tensor");
}

// An importable module with no functions: `import mpq_ops._C` loads this
// shared library, which runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
