// A CPU allocator that recycles freed buffers by size while a dac_fast inference call runs.
//
// Why: with glibc's default settings every large temporary is a fresh mmap (or regrows a trimmed heap),
// and the page faults cost as much as the arithmetic. A tiled forward pass allocates the same sizes
// tile after tile, so keeping freed blocks for the next tile removes nearly all of those faults without
// touching the process-wide malloc settings (a library must not call mallopt behind the user's back).
//
// Scope: installed as torch's CPU allocator on the first enter() and put back, with every cached block
// freed, on the matching exit(); blocks still owned by live tensors go back to c10::free_cpu when those
// tensors die. Thread-safe (one mutex; a forward pass makes a few hundred allocations per tile).
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstdint>
#include <cstdlib>
#include <algorithm>
#include <iterator>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "dac_fast_ops.h"

namespace dac_fast {
namespace {

constexpr size_t kRound = 4096;  // sizes rounded to pages so near-equal requests share blocks

// Bounds: a freed block is kept only while the cache stays under the scope's peak of bytes in use (one
// tile's working set; at least DAC_FAST_CPU_CACHE_MB, default 64), and a miss first frees cached blocks
// so that bytes in use + cached never pass that peak: the cache reuses memory the computation needed
// anyway instead of adding to it.
size_t capacity_from_env() {
  const char* v = std::getenv("DAC_FAST_CPU_CACHE_MB");
  const long mb = v != nullptr ? std::strtol(v, nullptr, 10) : 64;
  return static_cast<size_t>(mb > 0 ? mb : 0) << 20;
}

class BufferCache final : public c10::Allocator {
 public:
  static BufferCache& get() {
    static BufferCache* cache = new BufferCache();  // never destroyed: deleters may run at exit
    return *cache;
  }

  bool enter() {
    std::lock_guard<std::mutex> lock(mu_);
    if (depth_ == 0) {
      scope_base_bytes_ = peak_live_bytes_ = live_bytes_;  // blocks still alive from an earlier scope
      previous_ = c10::GetCPUAllocator();
      c10::SetCPUAllocator(this, /*priority=*/0);
      installed_ = c10::GetCPUAllocator() == this;  // a higher-priority allocator keeps its place
    }
    ++depth_;
    return installed_;
  }

  void exit() {
    std::vector<void*> to_free;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (depth_ == 0) return;
      if (--depth_ > 0) return;
      if (installed_) c10::SetCPUAllocator(previous_, /*priority=*/0);
      installed_ = false;
      for (auto& kv : free_) to_free.push_back(kv.second);
      free_.clear();
      cached_bytes_ = 0;
    }
    for (void* p : to_free) c10::free_cpu(p);
  }

  int64_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int64_t>(cached_bytes_);
  }

  at::DataPtr allocate(size_t n) override {
    const c10::Device cpu(c10::DeviceType::CPU);
    if (n == 0) return {nullptr, nullptr, &release, cpu};
    const size_t size = (n + kRound - 1) / kRound * kRound;
    void* p = nullptr;
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mu_);
      // best fit up to twice the request: layers differ by a few frames of padding and, stage to stage,
      // by halved time and doubled channels, so freed blocks serve the next stage too
      auto it = free_.lower_bound(size);
      if (it != free_.end() && it->first <= 2 * size) {
        p = it->second;
        cached_bytes_ -= it->first;
        live_[p] = it->first;
        note_live(it->first);
        free_.erase(it);
      } else {
        // a miss: give back cached blocks (largest first) rather than let this scope's memory (in use +
        // cached) grow past its peak in use, which is what the computation needs without any cache
        const size_t in_use = live_bytes_ - std::min(live_bytes_, scope_base_bytes_);
        const size_t target = std::max(peak_live_bytes_ - scope_base_bytes_, in_use + size);
        while (!free_.empty() && in_use + cached_bytes_ + size > target) {
          auto largest = std::prev(free_.end());
          cached_bytes_ -= largest->first;
          evicted.push_back(largest->second);
          free_.erase(largest);
        }
      }
    }
    for (void* q : evicted) c10::free_cpu(q);
    if (p == nullptr) {
      p = c10::alloc_cpu(size);
      std::lock_guard<std::mutex> lock(mu_);
      live_[p] = size;
      note_live(size);
    }
    return {p, p, &release, cpu};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

 private:
  static void release(void* p) {
    if (p == nullptr) return;
    BufferCache& c = get();
    {
      std::lock_guard<std::mutex> lock(c.mu_);
      auto it = c.live_.find(p);
      if (it != c.live_.end()) {
        const size_t size = it->second;
        c.live_.erase(it);
        c.live_bytes_ -= size;
        c.scope_base_bytes_ = std::min(c.scope_base_bytes_, c.live_bytes_);
        const size_t bound = std::max(c.capacity_, c.peak_live_bytes_ - c.scope_base_bytes_);
        if (c.depth_ > 0 && c.cached_bytes_ + size <= bound) {  // keep it for the next tile
          c.free_.emplace(size, p);
          c.cached_bytes_ += size;
          return;
        }
      }
    }
    c10::free_cpu(p);
  }

  std::mutex mu_;
  int depth_ = 0;
  bool installed_ = false;
  c10::Allocator* previous_ = nullptr;
  std::unordered_map<void*, size_t> live_;
  std::multimap<size_t, void*> free_;  // size -> freed block
  void note_live(size_t size) {  // mu_ held
    live_bytes_ += size;
    peak_live_bytes_ = std::max(peak_live_bytes_, live_bytes_);
  }

  size_t cached_bytes_ = 0;
  size_t live_bytes_ = 0, peak_live_bytes_ = 0, scope_base_bytes_ = 0;  // bytes of our blocks in use
  size_t capacity_ = capacity_from_env();
};

}  // namespace

bool buffer_cache_enter() { return BufferCache::get().enter(); }
void buffer_cache_exit() { BufferCache::get().exit(); }
int64_t buffer_cache_bytes() { return BufferCache::get().cached_bytes(); }

}  // namespace dac_fast
