/*
 * qwen35-mobile: src/support/ring_buffer.h for building TVM's web runtime from the wheel
 * (see include/tvm/support/io.h).  The byte queue the RPC endpoint buffers its
 * channel with: Write appends, Read takes from the front; the *WithCallback forms
 * hand a contiguous span to a channel's send/recv and move by what it reports.
 */
#ifndef TVM_SUPPORT_RING_BUFFER_H_
#define TVM_SUPPORT_RING_BUFFER_H_

#include <tvm/ffi/error.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace tvm {
namespace support {

class RingBuffer {
 public:
  RingBuffer() : ring_(kInitCapacity) {}
  /*! \return the number of bytes queued. */
  size_t bytes_available() const { return size_; }
  /*! \return the capacity. */
  size_t capacity() const { return ring_.size(); }
  /*! \brief Make room for n bytes in all (never drops queued bytes). */
  void Reserve(size_t n) {
    if (ring_.size() >= n) return;
    size_t cap = ring_.size();
    while (cap < n) cap *= 2;
    std::vector<char> grown(cap);
    CopyOut(grown.data(), size_);
    ring_.swap(grown);
    head_ = 0;
  }
  /*! \brief Take size bytes from the front (size <= bytes_available()). */
  void Read(void* data, size_t size) {
    TVM_FFI_ICHECK_GE(size_, size);
    CopyOut(static_cast<char*>(data), size);
    Drop(size);
  }
  /*! \brief Append size bytes. */
  void Write(const void* data, size_t size) {
    Reserve(size_ + size);
    const char* src = static_cast<const char*>(data);
    size_t tail = (head_ + size_) % ring_.size();
    size_t first = std::min(size, ring_.size() - tail);
    std::memcpy(ring_.data() + tail, src, first);
    std::memcpy(ring_.data(), src + first, size - first);
    size_ += size;
  }
  /*! \brief f(const void* data, size_t n) -> bytes consumed, on up to max_nbytes from the front. */
  template <typename F>
  size_t ReadWithCallback(F f, size_t max_nbytes) {
    size_t n = std::min({max_nbytes, size_, ring_.size() - head_});
    if (n == 0) return 0;
    size_t done = f(ring_.data() + head_, n);
    Drop(done);
    return done;
  }
  /*! \brief f(void* data, size_t n) -> bytes produced, into up to max_nbytes at the back. */
  template <typename F>
  size_t WriteWithCallback(F f, size_t max_nbytes) {
    Reserve(size_ + max_nbytes);
    size_t tail = (head_ + size_) % ring_.size();
    // the contiguous free span after the tail (Reserve made room for max_nbytes in all)
    size_t span = tail < head_ ? head_ - tail : ring_.size() - tail;
    size_t n = std::min(max_nbytes, span);
    size_t done = f(ring_.data() + tail, n);
    size_ += done;
    return done;
  }

 private:
  static constexpr size_t kInitCapacity = 4096;
  void CopyOut(char* dst, size_t size) const {
    size_t first = std::min(size, ring_.size() - head_);
    std::memcpy(dst, ring_.data() + head_, first);
    std::memcpy(dst + first, ring_.data(), size - first);
  }
  void Drop(size_t size) {
    head_ = (head_ + size) % ring_.size();
    size_ -= size;
    if (size_ == 0) head_ = 0;
  }
  std::vector<char> ring_;
  size_t head_ = 0;
  size_t size_ = 0;
};

}  // namespace support
}  // namespace tvm

#endif  // TVM_SUPPORT_RING_BUFFER_H_
