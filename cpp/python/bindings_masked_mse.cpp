// deem._C.masked_mse_forward / masked_mse_backward: validation and dispatch of the fused masked-MSE loss.
#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include "deem/masked_mse.h"
#include "registrations.h"
#include "tensor_arg.h"

namespace py = pybind11;

namespace deem::python {
namespace {

[[noreturn]] void fail(const std::string& msg) { throw ArgumentError(msg); }

struct MaskedMseCall {
  MaskedMseProblem problem;
  TensorArg pred, target, mask;
};

// pred [B, C, P], target [B, C, P] (pred's dtype or its accumulation dtype), mask [B, P] bool/uint8 or None.
MaskedMseCall check(py::handle pred_h, py::handle target_h, py::handle mask_h, double eps) {
  MaskedMseCall call;
  call.pred = parse_tensor(pred_h, "pred");
  call.target = parse_tensor(target_h, "target");
  call.mask = parse_tensor(mask_h, "mask", /*optional=*/true);
  auto& pr = call.problem;
  const TensorArg& pred = call.pred;
  pred.require_ndim(3, "[B, C, P] (images, channels, pixels)");
  pr.pred_dtype = pred.float_dtype();
  pred.require_contiguous();
  pr.batch = pred.dim(0);
  pr.channels = pred.dim(1);
  pr.pixels = pred.dim(2);
  element_count(pred.shape, "pred: B * C * P");
  call.target.require_shape(pred.shape, "[B, C, P] (the shape of pred)");
  pr.target_dtype = call.target.float_dtype();
  if (pr.target_dtype != pr.pred_dtype && pr.target_dtype != acc_dtype(pr.pred_dtype)) {
    fail("target: expected dtype " + std::string(dtype_name(pr.pred_dtype)) + " or " +
         dtype_name(acc_dtype(pr.pred_dtype)) + " (pred is " + dtype_name(pr.pred_dtype) + "), got " +
         call.target.dtype_str());
  }
  call.target.require_same_device(pred);
  call.target.require_contiguous();
  pr.has_mask = call.mask.present;
  if (call.mask.present) {
    call.mask.require_shape({pr.batch, pr.pixels}, "[B, P] (one value per image pixel)");
    if (!((call.mask.code == 6 || call.mask.code == 1) && call.mask.bits == 8)) {
      fail("mask: expected a bool or uint8 tensor, got " + call.mask.dtype_str());
    }
    call.mask.require_same_device(pred);
    call.mask.require_contiguous();
  }
  if (!(eps > 0.0)) fail("eps: expected a positive number, got " + std::to_string(eps));
  pr.eps = eps;
  return call;
}

py::tuple shape_tuple(const std::vector<int64_t>& shape) {
  py::tuple t(shape.size());
  for (size_t i = 0; i < shape.size(); ++i) t[i] = shape[i];
  return t;
}

// An output from the allocator `(shape, dtype name) -> DLPack capsule`, called only after validation.
TensorArg allocate(py::handle alloc, const char* name, const std::vector<int64_t>& shape, DType dtype,
                   const TensorArg& ref, py::object& holder) {
  if (!PyCallable_Check(alloc.ptr())) fail(std::string(name) + ": expected an allocator (shape, dtype name) -> capsule");
  holder = alloc(shape_tuple(shape), dtype_name(dtype));
  TensorArg out = parse_tensor(holder, name);
  out.require_shape(shape, "(allocated)");
  out.require_dtype(dtype);
  out.require_same_device(ref);
  out.require_contiguous();
  return out;
}

template <typename Cpu, typename Cuda>
void run_on_device(const TensorArg& ref, Cpu&& cpu, Cuda&& cuda) {
  py::gil_scoped_release release;
  if (ref.device == Device::kCPU) {
    cpu();
  } else {
    CudaDeviceGuard guard(ref.device_id);
    cuda();
  }
}

// Writes the loss [] and the per-image scales [B] (accumulation dtype) through `alloc`.
void masked_mse_forward(py::handle pred_h, py::handle target_h, py::handle mask_h, double eps, py::handle alloc,
                        uintptr_t stream, int num_threads) {
  const MaskedMseCall call = check(pred_h, target_h, mask_h, eps);
  const auto& pr = call.problem;
  if (call.pred.device != Device::kCPU && call.pred.device != Device::kCUDA) {
    fail("pred: expected a CPU or CUDA tensor, got " + call.pred.device_str());
  }
  if (pr.batch * pr.channels * pr.pixels == 0) fail("pred: expected a non-empty [B, C, P] tensor, got " + call.pred.shape_str());
  const DType acc = acc_dtype(pr.pred_dtype);
  py::object holders[3];
  const TensorArg loss = allocate(alloc, "loss", {}, acc, call.pred, holders[0]);
  const TensorArg scale = allocate(alloc, "scale", {pr.batch}, acc, call.pred, holders[1]);
  MaskedMseForwardArgs args;
  args.pred = call.pred.data;
  args.target = call.target.data;
  args.mask = call.mask.present ? static_cast<const uint8_t*>(call.mask.data) : nullptr;
  args.loss = loss.data;
  args.scale = scale.data;
  if (call.pred.device == Device::kCUDA) {
    if (pr.batch > 65535) fail("pred: at most 65535 images per call on CUDA, got B = " + std::to_string(pr.batch));
    const TensorArg ws = allocate(alloc, "workspace", {masked_mse_workspace_elements(pr)}, acc, call.pred, holders[2]);
    args.workspace = ws.data;
  }
  run_on_device(call.pred, [&] { masked_mse_forward_cpu(pr, args, num_threads); },
                [&] { masked_mse_forward_cuda(pr, args, reinterpret_cast<void*>(stream)); });
}

void masked_mse_backward(py::handle grad_loss_h, py::handle pred_h, py::handle target_h, py::handle mask_h,
                         py::handle scale_h, double eps, py::handle alloc, uintptr_t stream, int num_threads) {
  const MaskedMseCall call = check(pred_h, target_h, mask_h, eps);
  const auto& pr = call.problem;
  const DType acc = acc_dtype(pr.pred_dtype);
  const TensorArg grad_loss = parse_tensor(grad_loss_h, "grad_loss");
  const TensorArg scale = parse_tensor(scale_h, "scale");
  for (const TensorArg* t : {&grad_loss, &scale}) {
    t->require_dtype(acc);
    t->require_same_device(call.pred);
    t->require_contiguous();
  }
  grad_loss.require_shape({}, "[] (a scalar)");
  scale.require_shape({pr.batch}, "[B] (from the forward)");
  py::object holder;
  const TensorArg grad = allocate(alloc, "grad_pred", call.pred.shape, pr.pred_dtype, call.pred, holder);
  MaskedMseBackwardArgs args;
  args.pred = call.pred.data;
  args.target = call.target.data;
  args.mask = call.mask.present ? static_cast<const uint8_t*>(call.mask.data) : nullptr;
  args.scale = scale.data;
  args.grad_loss = grad_loss.data;
  args.grad_pred = grad.data;
  if (pr.batch * pr.channels * pr.pixels == 0) return;
  run_on_device(call.pred, [&] { masked_mse_backward_cpu(pr, args, num_threads); },
                [&] { masked_mse_backward_cuda(pr, args, reinterpret_cast<void*>(stream)); });
}

}  // namespace

void register_masked_mse(py::module_& m) {
  m.def("masked_mse_forward", &masked_mse_forward, py::arg("pred"), py::arg("target"), py::arg("mask"),
        py::arg("eps"), py::arg("alloc"), py::arg("stream") = 0, py::arg("num_threads") = 1,
        "Validate, then write the masked-MSE loss [] and the per-image scales [B] (allocated through "
        "alloc(shape, dtype name), which also gives the CUDA workspace).");
  m.def("masked_mse_backward", &masked_mse_backward, py::arg("grad_loss"), py::arg("pred"), py::arg("target"),
        py::arg("mask"), py::arg("scale"), py::arg("eps"), py::arg("alloc"), py::arg("stream") = 0,
        py::arg("num_threads") = 1, "Validate, then write d(loss)/d(pred) (allocated through alloc).");
}

}  // namespace deem::python
