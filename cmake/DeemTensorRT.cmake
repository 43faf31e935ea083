# TensorRT discovery for the plugin library (cpp/tensorrt) from DEEM_TENSORRT = AUTO | ON | OFF.
#
# Only the public headers are needed (NvInfer*.h; the plugins call no libnvinfer symbol: TensorRT loads the library
# and takes its creators through getCreators). They are looked for under TensorRT_ROOT (CMake variable or
# environment), then the system include directories. Sets DEEM_WITH_TENSORRT, DEEM_TENSORRT_INCLUDE_DIR and
# DEEM_TENSORRT_VERSION (from NvInferVersion.h).
set(DEEM_WITH_TENSORRT OFF)
string(TOUPPER "${DEEM_TENSORRT}" _deem_trt)
if(_deem_trt STREQUAL "OFF")
  message(STATUS "deem: TensorRT plugins disabled (DEEM_TENSORRT=OFF)")
  return()
endif()

set(_deem_trt_hints)
if(TensorRT_ROOT)
  list(APPEND _deem_trt_hints "${TensorRT_ROOT}")
endif()
if(DEFINED ENV{TensorRT_ROOT})
  list(APPEND _deem_trt_hints "$ENV{TensorRT_ROOT}")
endif()
find_path(DEEM_TENSORRT_INCLUDE_DIR NvInferRuntime.h HINTS ${_deem_trt_hints} PATH_SUFFIXES include)
find_package(CUDAToolkit QUIET)  # the TensorRT headers include cuda_runtime_api.h

set(_deem_trt_missing)
if(NOT DEEM_TENSORRT_INCLUDE_DIR)
  list(APPEND _deem_trt_missing "the TensorRT headers (NvInferRuntime.h; set TensorRT_ROOT to the directory above include/)")
endif()
if(NOT CUDAToolkit_FOUND)
  list(APPEND _deem_trt_missing "the CUDA toolkit headers (cuda_runtime_api.h)")
endif()
if(_deem_trt_missing)
  if(_deem_trt STREQUAL "ON")
    message(FATAL_ERROR "deem: DEEM_TENSORRT=ON but not found: ${_deem_trt_missing}")
  endif()
  message(STATUS "deem: TensorRT plugins not built (not found: ${_deem_trt_missing})")
  return()
endif()

file(READ "${DEEM_TENSORRT_INCLUDE_DIR}/NvInferVersion.h" _deem_trt_version_h)
set(_deem_trt_parts)
foreach(_part MAJOR MINOR PATCH)
  # TensorRT >= 10.x defines NV_TENSORRT_<PART> through TRT_<PART>_ENTERPRISE; older headers define the number directly
  if(_deem_trt_version_h MATCHES "#define TRT_${_part}_ENTERPRISE ([0-9]+)")
    list(APPEND _deem_trt_parts "${CMAKE_MATCH_1}")
  elseif(_deem_trt_version_h MATCHES "#define NV_TENSORRT_${_part} ([0-9]+)")
    list(APPEND _deem_trt_parts "${CMAKE_MATCH_1}")
  else()
    list(APPEND _deem_trt_parts "?")
  endif()
endforeach()
list(JOIN _deem_trt_parts "." DEEM_TENSORRT_VERSION)
set(DEEM_WITH_TENSORRT ON)
message(STATUS "deem: TensorRT plugins enabled (headers ${DEEM_TENSORRT_VERSION} in ${DEEM_TENSORRT_INCLUDE_DIR})")
