// What <cuda_runtime.h>, <cuda_bf16.h> and <cuda_fp16.h> provide to the kernels, emulated.
#pragma once

#include "cuda_types.h"
#include "intrinsics.h"
#include "machine.h"
