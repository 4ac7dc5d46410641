// Every fastmnist op schema, in one place. Kernels register per device with TORCH_LIBRARY_IMPL in
// csrc/cpu/*.cpp and csrc/cuda/*.cu, autograd in csrc/*_autograd.cpp; fake (shape) kernels are registered from
// Python in fastmnist/ops/. Backward kernels are ops of their own, so that torch.compile can trace them.
// csrc/python_module.cpp holds the Python module fastmnist._C and its direct entry points to the forward ops.
//
// Conventions: `output_mask` says which gradients the caller needs; a gradient that is not needed comes back
// as an empty tensor and is never computed. Activation names are strings ("identity", "relu", "leaky_relu",
// "sigmoid", "tanh"), checked by the kernels.

#include <torch/library.h>

#include "cpu/simd.h"

TORCH_LIBRARY(fastmnist, m) {
  // ---- linear + activation (csrc/cpu/linear_act.cpp) ----
  // out = activation(x @ weight.T + bias); x: (M, K) contiguous rows, weight: (N, K), bias: (N,).
  m.def("linear_act(Tensor x, Tensor weight, Tensor? bias, str activation, float negative_slope) -> Tensor");
  // Gradients of linear_act from its output `out` (the activation derivative is a function of the output).
  // Returns (grad_x, grad_weight, grad_bias).
  m.def(
      "linear_act_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor out, str activation, "
      "float negative_slope, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // ---- losses (csrc/cpu/cross_entropy.cpp, csrc/cpu/sigmoid_bce.cpp) ----
  // Reductions are ints as in ATen: 0 none, 1 mean, 2 sum.
  // Softmax cross-entropy of logits (rows, C) with class-index targets (rows,) int64 or probability targets
  // (rows, C). Returns (loss: (rows,) for none else (), lse: (rows,) float64, saved for backward).
  m.def(
      "softmax_cross_entropy(Tensor logits, Tensor target, Tensor? weight, int ignore_index, int reduction, "
      "float label_smoothing) -> (Tensor, Tensor)");
  // Returns (grad_logits, grad_target); grad_target only for probability targets.
  m.def(
      "softmax_cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, Tensor lse, "
      "int ignore_index, int reduction, float label_smoothing, bool[2] output_mask) -> (Tensor, Tensor)");
  // Classifier head: softmax cross-entropy of logits x @ weight.T + bias without storing them. x: (N, in),
  // weight: (D * C, in), bias: (D * C,); each row of the GEMM output is D rows of C classes (targets (N * D,)
  // or (N * D, C)). When grad_mask asks for gradients and the loss is reduced, they are computed for
  // grad_output = 1 and returned; otherwise empty. Returns (loss, lse, grad_x, grad_weight, grad_bias).
  m.def(
      "linear_cross_entropy(Tensor x, Tensor weight, Tensor? bias, Tensor target, Tensor? class_weight, "
      "int num_classes, int ignore_index, int reduction, float label_smoothing, bool[3] grad_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Gradients of linear_cross_entropy for any grad_loss, recomputing the logits chunk by chunk.
  m.def(
      "linear_cross_entropy_backward(Tensor grad_loss, Tensor x, Tensor weight, Tensor? bias, Tensor target, "
      "Tensor? class_weight, Tensor lse, int num_classes, int ignore_index, int reduction, float label_smoothing, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // Sigmoid + binary cross-entropy of logits (rows, C) against target (rows, C); weight and pos_weight are
  // (C,) or (rows, C). Returns the loss ((rows, C) for none, else ()).
  m.def("sigmoid_bce(Tensor logits, Tensor target, Tensor? weight, Tensor? pos_weight, int reduction) -> Tensor");
  // Returns (grad_logits, grad_target).
  m.def(
      "sigmoid_bce_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, Tensor? pos_weight, "
      "int reduction, bool[2] output_mask) -> (Tensor, Tensor)");

  // ---- LeNet block (csrc/cpu/conv_act_pool.cpp) ----
  // out = avg_pool2d(activation(conv2d(x, weight, bias, stride=1, padding)), 2); x: (N, C_in, H, W) or
  // (C_in, H, W), weight: (C_out, C_in, k, k), bias: (C_out,). activation: identity, relu, sigmoid or tanh.
  // `act` is what backward needs: the activation output at the conv positions the pooling reads,
  // (N, C_out, 2*H_out, 2*W_out), written only when save_act (else an empty tensor).
  m.def(
      "conv_act_pool(Tensor x, Tensor weight, Tensor? bias, int padding, str activation, bool save_act) -> "
      "(Tensor out, Tensor act)");
  // Gradients of conv_act_pool; `act` as saved by the forward (unused, may be empty, for the identity).
  // Returns (grad_x, grad_weight, grad_bias).
  m.def(
      "conv_act_pool_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor act, int padding, str activation, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // ---- CPU code path selection, for tests of the vectorised and portable kernels ----
  // "auto" (AVX2+FMA when the CPU has it), "avx2" or "portable". Returns the path now in use.
  m.def("set_cpu_path(str path) -> str", [](c10::string_view path) {
    return fastmnist::cpu::set_cpu_path(std::string(path));
  });
}
