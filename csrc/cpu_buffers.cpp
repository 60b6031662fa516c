// Large CPU output buffers, shared by every instruction set's copy of the kernels (one cache:
// compiled once, with the extension's portable flags).

#include "spkern.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/accumulate.h>

#include <cstdlib>
#include <mutex>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace spkern {
namespace cpu {
namespace {

// Large output buffers (the gradient) are 2 MB aligned and marked for transparent
// huge pages, so that their first touch costs one page fault per 2 MB instead of per
// 4 KB (measured: 105 ms -> 43 ms to allocate and fill 512 MB). The last one freed is
// kept and handed to the next request of the same size: a training step frees the
// previous step's gradient before it asks for the next one, which then needs no page
// faults and no zeroing at all. release_cached_buffer() returns it to the system.
constexpr size_t kHugePage = size_t(2) << 20;

struct BufferCache {
  std::mutex mutex;
  void* ptr = nullptr;
  size_t bytes = 0;
};

BufferCache& buffer_cache() {
  static BufferCache* cache = new BufferCache();  // never destroyed: safe at exit
  return *cache;
}

void release_large(void* ptr, size_t bytes) {
  auto& cache = buffer_cache();
  {
    std::lock_guard<std::mutex> lock(cache.mutex);
    if (cache.ptr == nullptr) {
      cache.ptr = ptr;
      cache.bytes = bytes;
      return;
    }
  }
  free(ptr);
}

}  // namespace

at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t nbytes = size_t(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (nbytes >= 4 * kHugePage) {
    const size_t padded = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    void* ptr = nullptr;
    {
      auto& cache = buffer_cache();
      std::lock_guard<std::mutex> lock(cache.mutex);
      if (cache.ptr != nullptr && cache.bytes == padded) std::swap(ptr, cache.ptr);
    }
    if (ptr == nullptr && posix_memalign(&ptr, kHugePage, padded) == 0)
      madvise(ptr, padded, MADV_HUGEPAGE);
    if (ptr != nullptr)
      return at::from_blob(ptr, sizes, [padded](void* p) { release_large(p, padded); }, options);
  }
#endif
  return at::empty(sizes, options);
}

void release_cached_buffer() {
  auto& cache = buffer_cache();
  std::lock_guard<std::mutex> lock(cache.mutex);
  free(cache.ptr);
  cache.ptr = nullptr;
  cache.bytes = 0;
}

}  // namespace cpu
}  // namespace spkern
