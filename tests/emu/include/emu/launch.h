// Kernel launches and dynamic shared memory for csrc/kernels/launch.cuh under PEARLMOE_EMULATE.
#pragma once

#include "runtime.h"
