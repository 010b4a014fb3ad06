// Python module stub for mmkernels._C (pytorch/extension-cpp pattern): an empty module whose
// import runs the static TORCH_LIBRARY / TORCH_LIBRARY_IMPL registrations of this library.
// Uses only the limited C API, so the .so does not depend on libtorch_python.
#ifndef Py_LIMITED_API
#define Py_LIMITED_API 0x030A0000  // torch >= 2.10 defines it for py_limited_api builds
#endif
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "mmkernels compiled ops (registered under torch.ops.mmkernels)",
      -1,    // size of per-interpreter state
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}
