// The three kernel files compiled as C++ under the emulator (one translation unit).
// The kernel directory comes from -I (tests/kernels_emulated.rs passes -I kernels). The unnamed namespace
// gives every kernel-side function internal linkage, so the statics that stand for __shared__
// are not COMDAT and can all live in the "emushm" section.
#include "cuda_emu.h"
namespace {
#include "select.cu"
#include "merge.cu"
#include "scatter.cu"
}
