// Op families bound outside bindings.cpp, each registering its functions on deem._C.
#pragma once

#include <pybind11/pybind11.h>

namespace deem::python {

void register_masked_mse(pybind11::module_& m);  // bindings_masked_mse.cpp
void register_resampler(pybind11::module_& m);   // bindings_resampler.cpp

}  // namespace deem::python
