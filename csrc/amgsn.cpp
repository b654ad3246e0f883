// Python module init for amgsn._C.  The operators themselves are registered with the PyTorch
// dispatcher (TORCH_LIBRARY_FRAGMENT(amgsn, ...)) in the other translation units: importing this
// module loads the shared library, which runs those static registrations.  Python calls them as
// torch.ops.amgsn.<name>.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "amgsn compiled operators (registered under torch.ops.amgsn)",
      -1,    // size
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}
