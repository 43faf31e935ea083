// deem._C.qformer_attention_{forward,backward,fits}: validation and dispatch of the fused Q-Former attention.
#include <pybind11/pybind11.h>

#include <cmath>
#include <string>
#include <vector>

#include "deem/resampler.h"
#include "registrations.h"
#include "tensor_arg.h"

namespace py = pybind11;

namespace deem::python {
namespace {

[[noreturn]] void fail(const std::string& msg) { throw ArgumentError(msg); }

struct QFormerCall {
  QFormerAttentionProblem problem;
  TensorArg q, k, v, qw, qb, kw, kb, mask, seed;
};

void require_rows(const TensorArg& t, int64_t batch, int64_t width, const char* layout) {
  t.require_ndim(3, layout);
  if (t.dim(0) != batch || t.dim(2) != width) fail(t.name + ": expected shape " + layout + ", got " + t.shape_str());
  if (t.strides.at(2) != 1) fail(t.name + ": the last dimension must be contiguous, got strides of " + t.shape_str());
}

QFormerCall check(py::handle q_h, py::handle k_h, py::handle v_h, py::handle qw_h, py::handle qb_h, py::handle kw_h,
                  py::handle kb_h, py::handle mask_h, py::handle seed_h, int64_t heads, double eps, double scale,
                  double dropout_p) {
  QFormerCall c;
  c.q = parse_tensor(q_h, "q");
  c.k = parse_tensor(k_h, "k");
  c.v = parse_tensor(v_h, "v");
  c.qw = parse_tensor(qw_h, "q_weight", true);
  c.qb = parse_tensor(qb_h, "q_bias", true);
  c.kw = parse_tensor(kw_h, "k_weight", true);
  c.kb = parse_tensor(kb_h, "k_bias", true);
  c.mask = parse_tensor(mask_h, "key_mask", true);
  c.seed = parse_tensor(seed_h, "seed", true);
  auto& pr = c.problem;
  if (c.q.device != Device::kCUDA) fail("q: the compiled Q-Former attention runs on CUDA, got " + c.q.device_str());
  c.q.require_ndim(3, "[B, Lq, H * 64]");
  pr.dtype = c.q.float_dtype();
  if (pr.dtype != DType::kFloat16 && pr.dtype != DType::kBFloat16) {
    fail("q: expected float16 or bfloat16, got " + c.q.dtype_str());
  }
  if (heads < 1 || c.q.dim(2) % heads != 0) {
    fail("heads: " + std::to_string(heads) + " does not divide q's width " + std::to_string(c.q.dim(2)));
  }
  pr.batch = c.q.dim(0);
  pr.heads = heads;
  pr.queries = c.q.dim(1);
  pr.head_dim = c.q.dim(2) / heads;
  const int64_t width = c.q.dim(2);
  require_rows(c.q, pr.batch, width, "[B, Lq, H * 64]");
  require_rows(c.k, pr.batch, width, "[B, Lk, H * 64] (batch and width of q)");
  pr.keys = c.k.dim(1);
  require_rows(c.v, pr.batch, width, "[B, Lk, H * 64] (the shape of k)");
  if (c.v.dim(1) != pr.keys) fail("v: expected " + std::to_string(pr.keys) + " rows (as k), got " + c.v.shape_str());
  for (const TensorArg* t : {&c.k, &c.v}) {
    t->require_dtype(pr.dtype);
    t->require_same_device(c.q);
  }
  const TensorArg* qkv[3] = {&c.q, &c.k, &c.v};
  int64_t* strides[3] = {pr.q_strides, pr.k_strides, pr.v_strides};
  for (int i = 0; i < 3; ++i) {
    strides[i][0] = qkv[i]->strides.at(0);
    strides[i][1] = qkv[i]->strides.at(1);
  }
  pr.q_norm = c.qw.present;
  pr.k_norm = c.kw.present;
  if (c.qw.present != c.qb.present || c.kw.present != c.kb.present) {
    fail("q_weight/q_bias and k_weight/k_bias: give each LayerNorm's weight and bias together");
  }
  bool first = true;
  for (const TensorArg* t : {&c.qw, &c.qb, &c.kw, &c.kb}) {
    if (!t->present) continue;
    t->require_shape({pr.head_dim}, "[head_dim]");
    const DType dt = t->float_dtype();
    if (dt != DType::kFloat32 && dt != pr.dtype) {
      fail(t->name + ": expected float32 or " + dtype_name(pr.dtype) + ", got " + t->dtype_str());
    }
    if (first) pr.norm_fp32 = dt == DType::kFloat32;
    if ((dt == DType::kFloat32) != pr.norm_fp32) fail(t->name + ": every LayerNorm parameter must have one dtype");
    first = false;
    t->require_same_device(c.q);
    t->require_contiguous();
  }
  pr.has_key_mask = c.mask.present;
  if (c.mask.present) {
    c.mask.require_shape({pr.batch, pr.keys}, "[B, Lk]");
    if (!((c.mask.code == 6 || c.mask.code == 1) && c.mask.bits == 8)) {
      fail("key_mask: expected a bool or uint8 tensor, got " + c.mask.dtype_str());
    }
    c.mask.require_same_device(c.q);
    c.mask.require_contiguous();
  }
  if (!(eps > 0.0) || !std::isfinite(eps)) fail("eps: expected a positive number, got " + std::to_string(eps));
  if (!std::isfinite(scale)) fail("scale: expected a finite number");
  if (!(dropout_p >= 0.0 && dropout_p < 1.0)) fail("dropout_p: expected 0 <= p < 1, got " + std::to_string(dropout_p));
  pr.eps = static_cast<float>(eps);
  pr.scale = static_cast<float>(scale);
  pr.dropout_p = static_cast<float>(dropout_p);
  if (dropout_p > 0.0) {
    if (!c.seed.present) fail("seed: dropout needs an int64 seed tensor [1] on the device of q");
    c.seed.require_shape({1}, "[1]");
    if (!(c.seed.code == 0 && c.seed.bits == 64)) fail("seed: expected int64, got " + c.seed.dtype_str());
    c.seed.require_same_device(c.q);
  }
  element_count(c.q.shape, "q: B * Lq * width");
  element_count(c.k.shape, "k: B * Lk * width");
  return c;
}

py::tuple shape_tuple(const std::vector<int64_t>& shape) {
  py::tuple t(shape.size());
  for (size_t i = 0; i < shape.size(); ++i) t[i] = shape[i];
  return t;
}

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

QFormerAttentionForwardArgs forward_args(const QFormerCall& c) {
  QFormerAttentionForwardArgs a;
  a.q = c.q.data;
  a.k = c.k.data;
  a.v = c.v.data;
  a.q_weight = c.qw.present ? c.qw.data : nullptr;
  a.q_bias = c.qb.present ? c.qb.data : nullptr;
  a.k_weight = c.kw.present ? c.kw.data : nullptr;
  a.k_bias = c.kb.present ? c.kb.data : nullptr;
  a.key_mask = c.mask.present ? static_cast<const uint8_t*>(c.mask.data) : nullptr;
  a.seed = c.seed.present ? static_cast<const int64_t*>(c.seed.data) : nullptr;
  return a;
}

void require_fits(const QFormerAttentionProblem& pr) {
  if (!qformer_attention_fits(pr.queries, pr.keys, pr.head_dim)) {
    fail("q: the CUDA Q-Former attention needs head_dim 64 and (Lq, Lk) that fit one CTA's shared memory; got Lq = " +
         std::to_string(pr.queries) + ", Lk = " + std::to_string(pr.keys) + ", head_dim = " +
         std::to_string(pr.head_dim) + " (check qformer_attention_fits first)");
  }
}

// Returns nothing; writes out [B, Lq, H*64] (q's dtype) and lse [B, H, Lq] float32 through `alloc`.
void forward(py::handle q, py::handle k, py::handle v, py::handle qw, py::handle qb, py::handle kw, py::handle kb,
             py::handle mask, py::handle seed, int64_t heads, double eps, double scale, double dropout_p,
             py::handle alloc, uintptr_t stream) {
  const QFormerCall c = check(q, k, v, qw, qb, kw, kb, mask, seed, heads, eps, scale, dropout_p);
  const auto& pr = c.problem;
  CudaDeviceGuard guard(c.q.device_id);
  require_fits(pr);
  py::object holders[2];
  const TensorArg out = allocate(alloc, "out", {pr.batch, pr.queries, pr.heads * pr.head_dim}, pr.dtype, c.q, holders[0]);
  const TensorArg lse = allocate(alloc, "lse", {pr.batch, pr.heads, pr.queries}, DType::kFloat32, c.q, holders[1]);
  QFormerAttentionForwardArgs a = forward_args(c);
  a.out = out.data;
  a.lse = static_cast<float*>(lse.data);
  py::gil_scoped_release release;
  qformer_attention_forward_cuda(pr, a, reinterpret_cast<void*>(stream));
}

// Writes grad_q, grad_k, grad_v (q's dtype, contiguous) and, with LayerNorms, the parameter-gradient partials
// [4, B*H, 64] float32 (d q_weight, d q_bias, d k_weight, d k_bias per (b, h)) through `alloc`.
void backward(py::handle grad_out_h, py::handle q, py::handle k, py::handle v, py::handle qw, py::handle qb,
              py::handle kw, py::handle kb, py::handle mask, py::handle seed, py::handle out_h, py::handle lse_h,
              int64_t heads, double eps, double scale, double dropout_p, py::handle alloc, uintptr_t stream) {
  const QFormerCall c = check(q, k, v, qw, qb, kw, kb, mask, seed, heads, eps, scale, dropout_p);
  const auto& pr = c.problem;
  CudaDeviceGuard guard(c.q.device_id);
  require_fits(pr);
  const int64_t width = pr.heads * pr.head_dim;
  const TensorArg grad_out = parse_tensor(grad_out_h, "grad_out");
  const TensorArg out = parse_tensor(out_h, "out");
  const TensorArg lse = parse_tensor(lse_h, "lse");
  for (const TensorArg* t : {&grad_out, &out}) {
    t->require_shape({pr.batch, pr.queries, width}, "[B, Lq, H * 64]");
    t->require_dtype(pr.dtype);
    t->require_same_device(c.q);
    t->require_contiguous();
  }
  lse.require_shape({pr.batch, pr.heads, pr.queries}, "[B, H, Lq]");
  lse.require_dtype(DType::kFloat32);
  lse.require_same_device(c.q);
  lse.require_contiguous();
  py::object holders[4];
  const TensorArg gq = allocate(alloc, "grad_q", {pr.batch, pr.queries, width}, pr.dtype, c.q, holders[0]);
  const TensorArg gk = allocate(alloc, "grad_k", {pr.batch, pr.keys, width}, pr.dtype, c.q, holders[1]);
  const TensorArg gv = allocate(alloc, "grad_v", {pr.batch, pr.keys, width}, pr.dtype, c.q, holders[2]);
  QFormerAttentionBackwardArgs a;
  a.fwd = forward_args(c);
  a.fwd.out = const_cast<void*>(out.data);
  a.fwd.lse = static_cast<float*>(lse.data);
  a.grad_out = grad_out.data;
  a.grad_q = gq.data;
  a.grad_k = gk.data;
  a.grad_v = gv.data;
  if (pr.q_norm || pr.k_norm) {
    const TensorArg parts = allocate(alloc, "grad_norm_partials", {4, pr.batch * pr.heads, pr.head_dim},
                                     DType::kFloat32, c.q, holders[3]);
    a.grad_norm_partials = static_cast<float*>(parts.data);
  }
  py::gil_scoped_release release;
  qformer_attention_backward_cuda(pr, a, reinterpret_cast<void*>(stream));
}

bool fits(int64_t queries, int64_t keys, int64_t head_dim, int device) {
  CudaDeviceGuard guard(device);
  return qformer_attention_fits(queries, keys, head_dim);
}

}  // namespace

void register_resampler(py::module_& m) {
  m.def("qformer_attention_forward", &forward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("q_weight"),
        py::arg("q_bias"), py::arg("k_weight"), py::arg("k_bias"), py::arg("key_mask"), py::arg("seed"),
        py::arg("heads"), py::arg("eps"), py::arg("scale"), py::arg("dropout_p"), py::arg("alloc"),
        py::arg("stream") = 0, "Validate, then run the fused Q-Former attention forward (CUDA).");
  m.def("qformer_attention_backward", &backward, py::arg("grad_out"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("q_weight"), py::arg("q_bias"), py::arg("k_weight"), py::arg("k_bias"), py::arg("key_mask"),
        py::arg("seed"), py::arg("out"), py::arg("lse"), py::arg("heads"), py::arg("eps"), py::arg("scale"),
        py::arg("dropout_p"), py::arg("alloc"), py::arg("stream") = 0,
        "Validate, then run the fused Q-Former attention backward (CUDA).");
  m.def("qformer_attention_fits", &fits, py::arg("queries"), py::arg("keys"), py::arg("head_dim"),
        py::arg("device"), "Whether the CUDA kernels hold this problem on `device` (False without CUDA kernels).");
}

}  // namespace deem::python
