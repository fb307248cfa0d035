// Runtime of the test-only CUDA emulation (see cuda_compat.h): one std::thread per thread of a block;
// the threads walk the grid's blocks in order, in lockstep (a block ends when all its threads end).
#include "cuda_compat.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu {
namespace {

constexpr size_t kMaxSharedBytes = 48 * 1024;  // without cudaFuncSetAttribute opt-in
constexpr uint32_t kManyReaders = 0xffffffffu;

std::atomic<int64_t> g_timeout_ms{20000};
std::mutex g_atomic_mutex;

struct Abort {};  // unwinds a thread once the launch has failed

inline uint64_t stamp(uint32_t epoch, uint32_t who) { return (static_cast<uint64_t>(epoch) << 32) | who; }
inline uint32_t stamp_epoch(uint64_t s) { return static_cast<uint32_t>(s >> 32); }
inline uint32_t stamp_who(uint64_t s) { return static_cast<uint32_t>(s); }

}  // namespace

// One shared-memory array. Per 4-byte word: the last writer and the reader(s), stamped with the barrier
// epoch (thread id + 1; 0 = never).
struct Region {
  std::vector<unsigned char> data;
  std::unique_ptr<std::atomic<uint64_t>[]> written, read;
  size_t words = 0;
  explicit Region(size_t bytes) : data(bytes), words((bytes + 3) / 4) {
    written.reset(new std::atomic<uint64_t>[words]);
    read.reset(new std::atomic<uint64_t>[words]);
    poison();
  }
  void poison() {
    std::memset(data.data(), 0xff, data.size());  // NaN in every float type, -1 in integers
    for (size_t i = 0; i < words; ++i) {
      written[i].store(0, std::memory_order_relaxed);
      read[i].store(0, std::memory_order_relaxed);
    }
  }
};

namespace {

struct Warp {
  std::mutex m;
  std::condition_variable cv;
  int lanes = 32;
  int arrived = 0;
  unsigned mask = 0, waiting = 0;
  uint64_t gen = 0;
  uint64_t in[32] = {}, out[32] = {};
};

struct Launch {
  dim3 grid, block;
  size_t dynamic_bytes = 0;
  int threads = 0;
  const std::function<void()>* body = nullptr;
  std::chrono::milliseconds timeout{20000};

  std::mutex m;  // block barrier
  std::condition_variable cv;
  int arrived = 0, finished = 0;
  uint64_t gen = 0;
  std::atomic<uint32_t> epoch{1};

  std::mutex regions_m;
  std::vector<std::unique_ptr<Region>> regions;  // static shared arrays, in declaration order
  std::unique_ptr<Region> dynamic;
  std::vector<std::unique_ptr<Warp>> warps;

  std::atomic<bool> failed{false};
  std::mutex error_m;
  std::string error;

  void fail(const std::string& what) {
    {
      std::lock_guard<std::mutex> g(error_m);
      if (error.empty()) error = what;
    }
    failed.store(true);
    {  // wake every waiter (taking each lock first so no wake-up is lost)
      std::lock_guard<std::mutex> g(m);
    }
    cv.notify_all();
    for (auto& w : warps) {
      { std::lock_guard<std::mutex> g(w->m); }
      w->cv.notify_all();
    }
  }

  void reset_shared() {
    for (auto& r : regions) r->poison();
    if (dynamic) dynamic->poison();
    epoch.store(1);
  }
};

struct ThreadCtx {
  Launch* launch;
  int tid, lane, warp;
  size_t next_region;
};
thread_local ThreadCtx* t_ctx = nullptr;

std::string where() {
  ThreadCtx* c = t_ctx;
  return "thread (" + std::to_string(threadIdx.x) + "," + std::to_string(threadIdx.y) + "," + std::to_string(threadIdx.z) +
         ") of block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) +
         "), warp " + std::to_string(c ? c->warp : -1) + " lane " + std::to_string(c ? c->lane : -1);
}

ThreadCtx& ctx() {
  if (t_ctx == nullptr) throw std::runtime_error("CUDA emulation: device function called outside a launch");
  return *t_ctx;
}

[[noreturn]] void fail_here(const std::string& what) {
  ctx().launch->fail(what + " (" + where() + ")");
  throw Abort{};
}

// wait on `cv` until `*gen` moves past `seen`; a timeout fails the launch as a deadlock
void wait_generation(Launch& L, std::unique_lock<std::mutex>& lk, std::condition_variable& cv, const uint64_t* gen,
                     uint64_t seen, const std::string& waiting_at) {
  const auto deadline = std::chrono::steady_clock::now() + L.timeout;
  while (*gen == seen && !L.failed.load()) {
    if (cv.wait_until(lk, deadline) == std::cv_status::timeout && *gen == seen && !L.failed.load()) {
      lk.unlock();
      fail_here("deadlock: waited more than " + std::to_string(L.timeout.count()) + " ms at " + waiting_at);
    }
  }
  if (*gen == seen) throw Abort{};  // failed elsewhere
}

enum class Arrival { kSync, kBlockEnd };

void block_arrive(Arrival kind) {
  Launch& L = *ctx().launch;
  if (kind == Arrival::kBlockEnd) {  // leaving while the warp waits for this lane in a shuffle can never resolve
    Warp& w = *L.warps[ctx().warp];
    std::unique_lock<std::mutex> wl(w.m);
    if (w.arrived > 0 && (w.mask >> ctx().lane & 1u) && !(w.waiting >> ctx().lane & 1u)) {
      wl.unlock();
      fail_here("divergence: lane finished the block while its warp waits for it in a shuffle");
    }
  }
  std::unique_lock<std::mutex> lk(L.m);
  if (L.failed.load()) throw Abort{};
  ++L.arrived;
  if (kind == Arrival::kBlockEnd) ++L.finished;
  if (L.arrived == L.threads) {
    if (L.finished != 0 && L.finished != L.threads) {
      const std::string msg = "divergent __syncthreads: " + std::to_string(L.threads - L.finished) +
                              " threads wait at __syncthreads while " + std::to_string(L.finished) + " finished the block";
      lk.unlock();
      fail_here(msg);
    }
    if (kind == Arrival::kBlockEnd) L.reset_shared();
    else L.epoch.fetch_add(1);
    L.arrived = L.finished = 0;
    ++L.gen;
    lk.unlock();
    L.cv.notify_all();
    return;
  }
  wait_generation(L, lk, L.cv, &L.gen, L.gen,
                  kind == Arrival::kSync ? "__syncthreads (threads arrived: " + std::to_string(L.arrived) + " of " +
                                               std::to_string(L.threads) + ")"
                                         : "the end of the block");
}

void thread_main(Launch* L, int tid) {
  ThreadCtx c{L, tid, tid % 32, tid / 32, 0};
  t_ctx = &c;
  blockDim = L->block;
  gridDim = L->grid;
  threadIdx = dim3(tid % L->block.x, (tid / L->block.x) % L->block.y, tid / (L->block.x * L->block.y));
  try {
    for (unsigned z = 0; z < L->grid.z; ++z)
      for (unsigned y = 0; y < L->grid.y; ++y)
        for (unsigned x = 0; x < L->grid.x; ++x) {
          blockIdx = dim3(x, y, z);
          c.next_region = 0;
          try {
            (*L->body)();
          } catch (const Abort&) {
            throw;
          } catch (const std::exception& e) {
            fail_here(std::string("exception in the kernel: ") + e.what());
          }
          block_arrive(Arrival::kBlockEnd);
        }
  } catch (const Abort&) {
  }
  t_ctx = nullptr;
}

void check_launch_shape(dim3 grid, dim3 block, size_t shared_bytes) {
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  auto bad = [](const std::string& m) { throw std::runtime_error("CUDA emulation: invalid launch: " + m); };
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) bad("a grid dimension is 0");
  if (grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) bad("grid dimensions over CUDA's limits");
  if (threads == 0 || threads > 1024 || block.z > 64) bad("block of " + std::to_string(threads) + " threads");
  if (shared_bytes > kMaxSharedBytes) bad(std::to_string(shared_bytes) + " bytes of dynamic shared memory (over 48 KiB)");
}

}  // namespace

void set_timeout_ms(int64_t ms) { g_timeout_ms.store(ms); }

void run(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& body) {
  check_launch_shape(grid, block, shared_bytes);
  Launch L;
  L.grid = grid;
  L.block = block;
  L.dynamic_bytes = shared_bytes;
  L.threads = static_cast<int>(block.x * block.y * block.z);
  L.body = &body;
  L.timeout = std::chrono::milliseconds(g_timeout_ms.load());
  if (shared_bytes > 0) L.dynamic.reset(new Region(shared_bytes));
  for (int w = 0; w * 32 < L.threads; ++w) {
    L.warps.emplace_back(new Warp);
    L.warps.back()->lanes = std::min(32, L.threads - 32 * w);
  }
  std::vector<std::thread> pool;
  pool.reserve(L.threads);
  for (int t = 0; t < L.threads; ++t) pool.emplace_back(thread_main, &L, t);
  for (auto& th : pool) th.join();
  if (L.failed.load()) throw std::runtime_error("CUDA emulation: " + L.error);
}

void device_fail(const char* what) { fail_here(std::string("device check failed: ") + what); }

Region* shared_region(size_t bytes, bool dynamic) {
  Launch& L = *ctx().launch;
  if (dynamic) {
    if (!L.dynamic) fail_here("dynamic shared memory used but the launch gave none");
    return L.dynamic.get();
  }
  const size_t index = ctx().next_region++;
  std::lock_guard<std::mutex> g(L.regions_m);
  if (index < L.regions.size()) {
    if (L.regions[index]->data.size() != bytes) fail_here("threads declare different shared arrays");
    return L.regions[index].get();
  }
  size_t total = L.dynamic_bytes + bytes;
  for (auto& r : L.regions) total += r->data.size();
  if (total > kMaxSharedBytes) fail_here("more than 48 KiB of shared memory");
  L.regions.emplace_back(new Region(bytes));
  return L.regions.back().get();
}

unsigned char* region_data(Region* r) { return r->data.data(); }
size_t region_bytes(Region* r) { return r->data.size(); }

void check_read(Region* r, size_t offset, size_t bytes) {
  ThreadCtx& c = ctx();
  if (c.launch->failed.load()) throw Abort{};
  const uint32_t epoch = c.launch->epoch.load(), me = static_cast<uint32_t>(c.tid) + 1;
  for (size_t w = offset / 4; w < (offset + bytes + 3) / 4; ++w) {
    const uint64_t wr = r->written[w].load(std::memory_order_acquire);
    if (wr == 0) fail_here("read of uninitialized shared memory (byte " + std::to_string(w * 4) + ")");
    if (stamp_epoch(wr) == epoch && stamp_who(wr) != me)
      fail_here("shared-memory race: read of byte " + std::to_string(w * 4) + " written by thread " +
                std::to_string(stamp_who(wr) - 1) + " since the last __syncthreads");
    const uint64_t rd = r->read[w].load(std::memory_order_relaxed);
    if (stamp_epoch(rd) != epoch) r->read[w].store(stamp(epoch, me), std::memory_order_relaxed);
    else if (stamp_who(rd) != me && stamp_who(rd) != kManyReaders) r->read[w].store(stamp(epoch, kManyReaders), std::memory_order_relaxed);
  }
}

void check_write(Region* r, size_t offset, size_t bytes) {
  ThreadCtx& c = ctx();
  if (c.launch->failed.load()) throw Abort{};
  const uint32_t epoch = c.launch->epoch.load(), me = static_cast<uint32_t>(c.tid) + 1;
  for (size_t w = offset / 4; w < (offset + bytes + 3) / 4; ++w) {
    const uint64_t wr = r->written[w].load(std::memory_order_relaxed);
    if (wr != 0 && stamp_epoch(wr) == epoch && stamp_who(wr) != me)
      fail_here("shared-memory race: two threads write byte " + std::to_string(w * 4) + " between barriers");
    const uint64_t rd = r->read[w].load(std::memory_order_relaxed);
    if (stamp_epoch(rd) == epoch && stamp_who(rd) != me)
      fail_here("shared-memory race: write of byte " + std::to_string(w * 4) + " that another thread read since the last __syncthreads");
    r->written[w].store(stamp(epoch, me), std::memory_order_release);
  }
}

int lane_id() { return ctx().lane; }

void barrier() { block_arrive(Arrival::kSync); }

uint64_t warp_exchange(unsigned mask, uint64_t value, int src_lane, const char* op) {
  ThreadCtx& c = ctx();
  Launch& L = *c.launch;
  Warp& w = *L.warps[c.warp];
  const unsigned me = 1u << c.lane;
  const unsigned existing = w.lanes == 32 ? 0xffffffffu : ((1u << w.lanes) - 1u);
  if (!(mask & me)) fail_here(std::string(op) + ": the calling lane is not in the mask");
  if (mask & ~existing) fail_here(std::string(op) + ": the mask names lanes that do not exist in this (partial) warp");
  if (!(mask >> src_lane & 1u)) fail_here(std::string(op) + ": source lane " + std::to_string(src_lane) + " is not in the mask");
  std::unique_lock<std::mutex> lk(w.m);
  if (L.failed.load()) throw Abort{};
  if (w.arrived == 0) w.mask = mask;
  else if (w.mask != mask) {
    lk.unlock();
    fail_here(std::string(op) + ": lanes of the warp disagree on the mask");
  }
  w.in[c.lane] = value;
  w.waiting |= me;
  if (++w.arrived == __builtin_popcount(mask)) {
    std::memcpy(w.out, w.in, sizeof(w.in));
    w.arrived = 0;
    w.waiting = 0;
    ++w.gen;
    const uint64_t v = w.out[src_lane];
    lk.unlock();
    w.cv.notify_all();
    return v;
  }
  wait_generation(L, lk, w.cv, &w.gen, w.gen, std::string(op) + " (lanes arrived: " + std::to_string(w.arrived) + ")");
  return w.out[src_lane];
}

void atomic_lock() { g_atomic_mutex.lock(); }
void atomic_unlock() { g_atomic_mutex.unlock(); }

}  // namespace emu
