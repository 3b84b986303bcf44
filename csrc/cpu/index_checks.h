// Entry checks of the CPU kernels: what a direct torch.ops.sm4.* call must satisfy before a
// kernel dereferences an index or an offset.
//
// sm4.ops checks its arguments in Python first (sm4/_checks.py), but torch.ops.sm4.* can be
// called directly with hand-built metadata; without these checks an assignment_row, gather index,
// expert id or offset out of range reads or writes outside its tensor (a segfault, or silent heap
// corruption). On CPU tensors a check is a plain memory read, no device sync: each is one O(n)
// pass over the index (no copy), and the slow path that names the first bad entry runs only
// after the fast min/max pass has failed.
//
// The errors are c10::ValueError (Python ValueError: a wrong shape, value or range) and
// c10::TypeError (Python TypeError: a wrong dtype), the vocabulary of sm4.ops; each message
// names the op, the argument and both the expected and the received value.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <sstream>
#include <string>

namespace sm4 {

// Shape "(4, any)" for a message; -1 stands for a size the check leaves free.
inline std::string shape_text(std::initializer_list<int64_t> sizes) {
  std::ostringstream text;
  text << "(";
  int64_t d = 0;
  for (const int64_t size : sizes) {
    if (d++) text << ", ";
    if (size < 0) text << "any";
    else text << size;
  }
  text << (sizes.size() == 1 ? ",)" : ")");
  return text.str();
}

// t must have exactly these sizes (-1: any size); spec names them, e.g. "(T, k)".
inline void check_shape(const at::Tensor& t, std::initializer_list<int64_t> sizes, const char* op, const char* name,
                        const char* spec) {
  bool ok = t.dim() == static_cast<int64_t>(sizes.size());
  int64_t d = 0;
  for (const int64_t size : sizes) {
    if (ok && size >= 0 && t.size(d) != size) ok = false;
    ++d;
  }
  TORCH_CHECK_VALUE(ok, op, ": ", name, " must have shape ", spec, " = ", shape_text(sizes), ", got ", t.sizes());
}

inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(t.is_floating_point(), op, ": ", name,
                   " must be a floating-point tensor (float16, bfloat16, float32 or float64), got ", t.scalar_type());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType expected, const char* op, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == expected, op, ": ", name, " must be ", expected, ", got ", t.scalar_type());
}

inline void check_index_dtype(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, op, ": ", name,
                   " must be int32 or int64, got ", t.scalar_type());
}

// Every value in [low, high). One vectorisable min/max pass; on failure a second pass names the
// first bad entry (flat index) and its value.
inline void check_values_in(const int64_t* values, int64_t count, int64_t low, int64_t high, const char* op,
                            const char* name) {
  int64_t min = std::numeric_limits<int64_t>::max(), max = std::numeric_limits<int64_t>::min();
  for (int64_t i = 0; i < count; ++i) {
    min = values[i] < min ? values[i] : min;
    max = values[i] > max ? values[i] : max;
  }
  if (count == 0 || (min >= low && max < high)) return;
  for (int64_t i = 0; i < count; ++i)
    TORCH_CHECK_VALUE(values[i] >= low && values[i] < high, op, ": ", name, " values must lie in [", low, ", ", high,
                      "), but flat entry ", i, " is ", values[i]);
}

// An int64 index tensor (gather/scatter index, assignment_row): values in [low, high). Returns it
// contiguous (the tensor itself when it already is: no copy).
inline at::Tensor checked_index(const at::Tensor& index, int64_t low, int64_t high, const char* op, const char* name) {
  check_dtype(index, at::kLong, op, name);
  const at::Tensor values = index.contiguous();
  check_values_in(values.data_ptr<int64_t>(), values.numel(), low, high, op, name);
  return values;
}

// Expert offsets: (E + 1,) int64 (num_experts < 0: any E >= 0), offsets[0] = 0, non-decreasing,
// offsets[E] <= num_rows; so every expert's rows lie in [0, num_rows). O(E).
inline void check_offsets(const at::Tensor& offsets, int64_t num_experts, int64_t num_rows, const char* op,
                          const char* name = "expert_offsets") {
  check_dtype(offsets, at::kLong, op, name);
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.numel() >= 1 && (num_experts < 0 || offsets.numel() == num_experts + 1),
                    op, ": ", name, " must have shape (E + 1,)",
                    num_experts < 0 ? std::string() : " = " + shape_text({num_experts + 1}), ", got ", offsets.sizes());
  const at::Tensor values = offsets.contiguous();
  const int64_t* offset = values.data_ptr<int64_t>();
  const int64_t experts = values.numel() - 1;
  TORCH_CHECK_VALUE(offset[0] == 0, op, ": ", name, "[0] must be 0, got ", offset[0]);
  for (int64_t e = 0; e < experts; ++e)
    TORCH_CHECK_VALUE(offset[e] <= offset[e + 1], op, ": ", name, " must be non-decreasing, got ", name, "[", e,
                      "] = ", offset[e], " > ", name, "[", e + 1, "] = ", offset[e + 1]);
  TORCH_CHECK_VALUE(offset[experts] <= num_rows, op, ": ", name, "[-1] (the active rows) must be at most the ",
                    num_rows, " rows, got ", offset[experts]);
}

}  // namespace sm4
