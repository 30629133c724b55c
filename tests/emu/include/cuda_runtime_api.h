// Emulated CUDA header (tests/emu/include is on the include path only under PEARLMOE_EMULATE).
#pragma once
#include "emu/runtime.h"
