// The activations shared by the fused ops, and their derivatives written as functions of the OUTPUT
// y = f(z), so that backward needs only the saved output:
//   identity   f'(z) = 1
//   relu       f'(z) = y <= 0 ? 0 : 1               (0 at z = 0; 1 for a NaN, which passes through: as PyTorch)
//   leaky_relu f'(z) = y > 0 ? 1 : slope            (needs slope >= 0: only then does y > 0 mean z > 0)
//   sigmoid    f'(z) = y (1 - y)
//   tanh       f'(z) = 1 - y^2
// The scalar forward `activate` and the derivative are C10_HOST_DEVICE, for the CUDA kernels; the CPU kernels
// use their vectorised twins in cpu/activation_vec.h.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <type_traits>

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

// Calls f(ActivationConstant<A>{}) with the activation as a compile-time constant, so that each kernel is
// compiled once per activation with no branch inside: in f, `constexpr Activation A = decltype(a)::value;`.
template <Activation A>
using ActivationConstant = std::integral_constant<Activation, A>;

template <typename F>
inline auto with_activation(Activation act, F&& f) {
  switch (act) {
    case Activation::Identity: return f(ActivationConstant<Activation::Identity>{});
    case Activation::Relu: return f(ActivationConstant<Activation::Relu>{});
    case Activation::LeakyRelu: return f(ActivationConstant<Activation::LeakyRelu>{});
    case Activation::Sigmoid: return f(ActivationConstant<Activation::Sigmoid>{});
    case Activation::Tanh: break;
  }
  return f(ActivationConstant<Activation::Tanh>{});
}

// f(z) for one value (T float or double: the CUDA kernels call it in their accumulation type).
template <Activation A, typename T>
C10_HOST_DEVICE inline T activate(T z, T slope) {
  if constexpr (A == Activation::Identity) return z;
  if constexpr (A == Activation::Relu) return z < T(0) ? T(0) : z;  // a NaN stays NaN, as in torch.relu
  if constexpr (A == Activation::LeakyRelu) return z > T(0) ? z : z * slope;
  if constexpr (A == Activation::Sigmoid) return T(1) / (T(1) + std::exp(-z));  // saturates to 0 or 1
  if constexpr (A == Activation::Tanh) return std::tanh(z);
}

template <typename T>
C10_HOST_DEVICE inline T activation_grad_from_output(Activation act, T y, T slope) {
  switch (act) {
    case Activation::Identity: return T(1);
    case Activation::Relu: return y <= T(0) ? T(0) : T(1);
    case Activation::LeakyRelu: return y > T(0) ? T(1) : slope;
    case Activation::Sigmoid: return y * (T(1) - y);
    case Activation::Tanh: return T(1) - y * y;
  }
  return T(1);
}

}  // namespace fastmnist
