#pragma once
// The fused training step's entry point for fastmnist._C (python_module.cpp): FusedStep.step of a
// torch.classes.fastmnist.FusedStep object, without TorchScript's method call (argument matching against the
// method's schema, ~3 us per call).
#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>

#include <optional>

namespace fastmnist {

// Raises c10::Error when `step` is not a FusedStep.
double run_fused_step(const c10::intrusive_ptr<c10::ivalue::Object>& step, at::Tensor x, at::Tensor target,
                      std::optional<at::Tensor> index, double lr);

}  // namespace fastmnist
