// One device allocation carved into 256-byte aligned arrays (no CUDA headers: the CUDA
// launchers, their kernels and the emulated kernel tests share it). A Carver on nullptr hands
// out null pointers and only counts: carve once that way for the size, allocate, carve again
// for real.
#ifndef KVPOOL_KERNELS_CARVER_H_
#define KVPOOL_KERNELS_CARVER_H_

#include <cstdint>

#include "kernels/host_device.h"

namespace kvpool::kernels {

class Carver {
 public:
  KVPOOL_HD explicit Carver(uint8_t* base) : base_(base) {}
  // `count` elements of T.
  template <typename T>
  KVPOOL_HD T* Take(uint64_t count) {
    T* p = reinterpret_cast<T*>(base_ == nullptr ? nullptr : base_ + used_);
    used_ += (count * sizeof(T) + 255) / 256 * 256;
    return p;
  }
  KVPOOL_HD uint64_t used() const { return used_; }

 private:
  uint8_t* base_;
  uint64_t used_ = 0;
};

// The bytes carve(&carver, args...) takes (a carving function's size).
template <typename Carve, typename... Args>
uint64_t CarvedBytes(Carve carve, const Args&... args) {
  Carver sizing(nullptr);
  carve(&sizing, args...);
  return sizing.used();
}

}  // namespace kvpool::kernels

#endif  // KVPOOL_KERNELS_CARVER_H_
