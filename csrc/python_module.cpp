// The fastmnist._C Python module: importing it loads the library (which registers the torch.ops.fastmnist ops),
// and it holds one direct entry point per forward op, `fastmnist._C.<op>(...)`, and one for the fused training
// step (fused_step, at the end).
//
// Why direct entry points: from Python, `torch.ops.fastmnist.<op>(...)` matches its arguments against the schema
// in Python and C++ before it reaches the dispatcher, ~5 us per call on this project's 2 GHz machine; the op itself
// takes 2-10 us at the tutorial models' batch-1 and batch-64 shapes. An entry point here converts plain arguments
// in C++ and calls the same op through the same dispatcher (autograd, dispatch modes, profiler, every kernel), so
// the results are identical and only the argument matching gets cheaper.
//
// They take the common case only: tensors that are exactly torch.Tensor or Parameter (no __torch_function__
// override) on a device the library has kernels for, no torch-function mode active, Python str / int / float /
// bool for the op's other arguments. For anything else they return NotImplemented and the Python wrapper calls
// torch.ops.fastmnist.<op>, which handles every case. Errors raised by the op come out as the same Python
// exceptions as through torch.ops.
#include <Python.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/python/module_python.h>

#include "cpu/fused_step.h"

#include <array>
#include <optional>
#include <tuple>
#include <utility>

namespace fastmnist {
namespace {

// ---- Python object -> C++ argument; false when the object is not of the plain kind taken here ----

bool on_supported_device(const at::Tensor& t) {
#ifdef FASTMNIST_WITH_CUDA
  return t.device().is_cpu() || t.device().is_cuda();
#else
  return t.device().is_cpu();
#endif
}

bool from_python(PyObject* obj, at::Tensor& out) {
  if (!THPVariable_CheckExact(obj)) return false;
  out = THPVariable_Unpack(obj);
  return on_supported_device(out);
}

bool from_python(PyObject* obj, std::optional<at::Tensor>& out) {
  if (obj == Py_None) {
    out.reset();
    return true;
  }
  at::Tensor t;
  if (!from_python(obj, t)) return false;
  out = std::move(t);
  return true;
}

// The view points into the str object, which the caller's argument tuple keeps alive during the call.
bool from_python(PyObject* obj, c10::string_view& out) {
  if (!PyUnicode_Check(obj)) return false;
  Py_ssize_t size = 0;
  const char* data = PyUnicode_AsUTF8AndSize(obj, &size);
  if (data == nullptr) {
    PyErr_Clear();
    return false;
  }
  out = c10::string_view(data, static_cast<size_t>(size));
  return true;
}

bool from_python(PyObject* obj, double& out) {
  if (PyFloat_CheckExact(obj)) {
    out = PyFloat_AS_DOUBLE(obj);
    return true;
  }
  if (!PyLong_CheckExact(obj)) return false;  // bool is a subclass of int, and not a number here
  out = PyLong_AsDouble(obj);
  if (out == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  return true;
}

bool from_python(PyObject* obj, int64_t& out) {
  if (!PyLong_CheckExact(obj)) return false;
  int overflow = 0;
  out = PyLong_AsLongLongAndOverflow(obj, &overflow);
  if (overflow != 0 || (out == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    return false;
  }
  return true;
}

bool from_python(PyObject* obj, bool& out) {
  if (!PyBool_Check(obj)) return false;
  out = obj == Py_True;
  return true;
}

template <size_t N>
bool from_python(PyObject* obj, std::array<bool, N>& out) {
  if (!PyList_CheckExact(obj) || PyList_GET_SIZE(obj) != static_cast<Py_ssize_t>(N)) return false;
  for (size_t i = 0; i < N; ++i) {
    if (!from_python(PyList_GET_ITEM(obj, i), out[i])) return false;
  }
  return true;
}

// ---- C++ result -> Python object ----

PyObject* to_python(at::Tensor&& t) { return THPVariable_Wrap(std::move(t)); }

template <class... Ts>
PyObject* to_python(std::tuple<Ts...>&& results) {
  constexpr size_t n = sizeof...(Ts);
  std::array<PyObject*, n> items =
      std::apply([](auto&... t) { return std::array<PyObject*, n>{to_python(std::move(t))...}; }, results);
  PyObject* tuple = PyTuple_New(n);
  bool ok = tuple != nullptr;
  for (PyObject* item : items) ok = ok && item != nullptr;
  if (!ok) {
    for (PyObject* item : items) Py_XDECREF(item);
    Py_XDECREF(tuple);
    return nullptr;
  }
  for (size_t i = 0; i < n; ++i) PyTuple_SET_ITEM(tuple, i, items[i]);
  return tuple;
}

// Releases the GIL while the op runs (as torch.ops does), so other Python threads can run meanwhile.
struct GilRelease {
  PyThreadState* state = PyEval_SaveThread();
  ~GilRelease() { PyEval_RestoreThread(state); }
};

template <size_t N>
struct OpName {
  constexpr OpName(const char (&text)[N]) {
    for (size_t i = 0; i < N; ++i) name[i] = text[i];
  }
  char name[N];
};

template <OpName Name, class Signature>
struct DirectCall;

template <OpName Name, class Result, class... Args>
struct DirectCall<Name, Result(Args...)> {
  static PyObject* call(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
    HANDLE_TH_ERRORS
    if (nargs != static_cast<Py_ssize_t>(sizeof...(Args))) {
      PyErr_Format(PyExc_TypeError, "%s takes %d positional arguments, got %zd", Name.name,
                   static_cast<int>(sizeof...(Args)), nargs);
      return nullptr;
    }
    if (at::impl::torch_function_mode_enabled()) Py_RETURN_NOTIMPLEMENTED;
    return convert_and_call(args, std::index_sequence_for<Args...>{});
    END_HANDLE_TH_ERRORS
  }

 private:
  template <size_t... I>
  static PyObject* convert_and_call(PyObject* const* args, std::index_sequence<I...>) {
    std::tuple<std::decay_t<Args>...> values;
    if (!(from_python(args[I], std::get<I>(values)) && ...)) Py_RETURN_NOTIMPLEMENTED;
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(Name.name, "").template typed<
        Result(Args...)>();
    Result result = [&] {
      GilRelease no_gil;
      return op.call(std::get<I>(values)...);
    }();
    return to_python(std::move(result));
  }
};

using TensorRef = const at::Tensor&;
using OptionalTensorRef = const std::optional<at::Tensor>&;
using Tensors2 = std::tuple<at::Tensor, at::Tensor>;
using Tensors5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// fused_step(step, x, target, index, lr) -> float: step.step(x, target, index, lr) of a
// torch.classes.fastmnist.FusedStep object (the whole training step, one call; see cpu/fused_step.h), or
// NotImplemented for arguments of another kind, which the caller then passes to step.step itself.
PyObject* fused_step(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 5) {
    PyErr_Format(PyExc_TypeError, "fused_step takes 5 positional arguments, got %zd", nargs);
    return nullptr;
  }
  if (at::impl::torch_function_mode_enabled()) Py_RETURN_NOTIMPLEMENTED;
  const std::optional<torch::jit::Object> step = torch::jit::as_object(args[0]);
  at::Tensor x, target;
  std::optional<at::Tensor> index;
  double lr = 0;
  if (!step.has_value() || !from_python(args[1], x) || !from_python(args[2], target) ||
      !from_python(args[3], index) || !from_python(args[4], lr))
    Py_RETURN_NOTIMPLEMENTED;
  const double loss = [&] {
    GilRelease no_gil;
    return run_fused_step(step->_ivalue(), std::move(x), std::move(target), std::move(index), lr);
  }();
  return PyFloat_FromDouble(loss);
  END_HANDLE_TH_ERRORS
}

// The signatures must be the ones the schemas in fastmnist.cpp declare (the dispatcher checks them on first call).
PyMethodDef methods[] = {
    {"linear_act",
     reinterpret_cast<PyCFunction>(
         DirectCall<"fastmnist::linear_act",
                    at::Tensor(TensorRef, TensorRef, OptionalTensorRef, c10::string_view, double)>::call),
     METH_FASTCALL, "torch.ops.fastmnist.linear_act(x, weight, bias, activation, negative_slope), or NotImplemented"},
    {"softmax_cross_entropy",
     reinterpret_cast<PyCFunction>(
         DirectCall<"fastmnist::softmax_cross_entropy",
                    Tensors2(TensorRef, TensorRef, OptionalTensorRef, int64_t, int64_t, double)>::call),
     METH_FASTCALL,
     "torch.ops.fastmnist.softmax_cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing), "
     "or NotImplemented"},
    {"linear_cross_entropy",
     reinterpret_cast<PyCFunction>(
         DirectCall<"fastmnist::linear_cross_entropy",
                    Tensors5(TensorRef, TensorRef, OptionalTensorRef, TensorRef, OptionalTensorRef, int64_t, int64_t,
                             int64_t, double, std::array<bool, 3>)>::call),
     METH_FASTCALL,
     "torch.ops.fastmnist.linear_cross_entropy(x, weight, bias, target, class_weight, num_classes, ignore_index, "
     "reduction, label_smoothing, grad_mask), or NotImplemented"},
    {"sigmoid_bce",
     reinterpret_cast<PyCFunction>(
         DirectCall<"fastmnist::sigmoid_bce",
                    at::Tensor(TensorRef, TensorRef, OptionalTensorRef, OptionalTensorRef, int64_t)>::call),
     METH_FASTCALL, "torch.ops.fastmnist.sigmoid_bce(logits, target, weight, pos_weight, reduction), or NotImplemented"},
    {"conv_act_pool",
     reinterpret_cast<PyCFunction>(
         DirectCall<"fastmnist::conv_act_pool",
                    Tensors2(TensorRef, TensorRef, OptionalTensorRef, int64_t, c10::string_view, bool)>::call),
     METH_FASTCALL,
     "torch.ops.fastmnist.conv_act_pool(x, weight, bias, padding, activation, save_act), or NotImplemented"},
    {"fused_step", reinterpret_cast<PyCFunction>(fused_step), METH_FASTCALL,
     "fused_step(step, x, target, index, lr): step.step(x, target, index, lr) of a "
     "torch.classes.fastmnist.FusedStep, or NotImplemented"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace
}  // namespace fastmnist

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, fastmnist::methods};
  return PyModule_Create(&module);
}
