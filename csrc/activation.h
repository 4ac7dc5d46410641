// The activations shared by the fused ops, and their derivatives written as functions of the OUTPUT
// y = f(z), so that backward needs only the saved output:
//   identity   f'(z) = 1
//   relu       f'(z) = [y > 0]                      (0 at z = 0, as PyTorch)
//   leaky_relu f'(z) = y > 0 ? 1 : slope            (needs slope >= 0: only then does y > 0 mean z > 0)
//   sigmoid    f'(z) = y (1 - y)
//   tanh       f'(z) = 1 - y^2
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>

namespace fastmnist {

enum class Activation { Identity, Relu, LeakyRelu, Sigmoid, Tanh };

inline Activation parse_activation(c10::string_view name) {
  if (name == "identity") return Activation::Identity;
  if (name == "relu") return Activation::Relu;
  if (name == "leaky_relu") return Activation::LeakyRelu;
  if (name == "sigmoid") return Activation::Sigmoid;
  if (name == "tanh") return Activation::Tanh;
  TORCH_CHECK(false, "fastmnist: unknown activation '", std::string(name),
              "'; expected one of identity, relu, leaky_relu, sigmoid, tanh");
}

inline void check_negative_slope(double negative_slope) {
  TORCH_CHECK(std::isfinite(negative_slope) && negative_slope >= 0,
              "fastmnist: negative_slope must be a finite number >= 0 (the backward pass recovers the "
              "derivative from the output, which is ambiguous for a negative slope), got ", negative_slope);
}

template <typename T>
C10_HOST_DEVICE inline T activation_grad_from_output(Activation act, T y, T slope) {
  switch (act) {
    case Activation::Identity: return T(1);
    case Activation::Relu: return y > T(0) ? T(1) : T(0);
    case Activation::LeakyRelu: return y > T(0) ? T(1) : slope;
    case Activation::Sigmoid: return y * (T(1) - y);
    case Activation::Tanh: return T(1) - y * y;
  }
  return T(1);
}

}  // namespace fastmnist
