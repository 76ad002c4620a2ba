// One device allocation carved into 256-byte aligned arrays (host code, no CUDA headers: the
// CUDA launchers and the emulated kernel tests share it). A Carver on nullptr hands out null
// pointers and only counts: carve once that way for the size, allocate, carve again for real.
#ifndef KVPOOL_KERNELS_CARVER_H_
#define KVPOOL_KERNELS_CARVER_H_

#include <cstdint>

namespace kvpool::kernels {

class Carver {
 public:
  explicit Carver(uint8_t* base) : base_(base) {}
  // `count` elements of T.
  template <typename T>
  T* Take(uint64_t count) {
    T* p = reinterpret_cast<T*>(base_ == nullptr ? nullptr : base_ + used_);
    used_ += (count * sizeof(T) + 255) / 256 * 256;
    return p;
  }
  uint64_t used() const { return used_; }

 private:
  uint8_t* base_;
  uint64_t used_ = 0;
};

}  // namespace kvpool::kernels

#endif  // KVPOOL_KERNELS_CARVER_H_
