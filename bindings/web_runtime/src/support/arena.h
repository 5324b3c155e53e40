/*
 * qwen35-mobile: src/support/arena.h for building TVM's web runtime from the wheel
 * (see include/tvm/support/io.h).  A bump allocator for the RPC endpoint's
 * per-message scratch: allocate_<T>(n) hands out aligned space, RecycleAll()
 * makes all of it reusable at once (pages are kept).
 */
#ifndef TVM_SUPPORT_ARENA_H_
#define TVM_SUPPORT_ARENA_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

namespace tvm {
namespace support {

class Arena {
 public:
  Arena() = default;
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  /*! \brief Space for count values of T (uninitialised, trivially destructible). */
  template <typename T>
  T* allocate_(int count = 1) {
    static_assert(std::is_trivially_destructible_v<T>, "Arena holds trivially destructible types");
    return static_cast<T*>(Alloc(sizeof(T) * static_cast<size_t>(count < 0 ? 0 : count), alignof(T)));
  }
  /*! \brief Make every allocation reusable. */
  void RecycleAll() {
    page_ = 0;
    offset_ = 0;
  }

 private:
  static constexpr size_t kPageSize = 16 << 10;
  struct Page {
    std::unique_ptr<std::max_align_t[]> data;
    size_t size;
  };
  void* Alloc(size_t size, size_t align) {
    if (align < alignof(std::max_align_t)) align = alignof(std::max_align_t);
    while (page_ < pages_.size()) {
      size_t start = (offset_ + align - 1) / align * align;
      if (start + size <= pages_[page_].size) {
        offset_ = start + size;
        return reinterpret_cast<char*>(pages_[page_].data.get()) + start;
      }
      ++page_;
      offset_ = 0;
    }
    size_t bytes = size > kPageSize ? size : kPageSize;
    size_t words = (bytes + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t);
    pages_.push_back(Page{std::unique_ptr<std::max_align_t[]>(new std::max_align_t[words]),
                          words * sizeof(std::max_align_t)});
    page_ = pages_.size() - 1;
    offset_ = size;
    return pages_.back().data.get();
  }
  std::vector<Page> pages_;
  size_t page_ = 0;
  size_t offset_ = 0;
};

}  // namespace support
}  // namespace tvm

#endif  // TVM_SUPPORT_ARENA_H_
