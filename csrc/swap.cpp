// StateSwapper (see swap.h). Streams and events go through c10's device-generic interfaces, so
// this file needs no CUDA headers except to pin host memory in place (cudaHostRegister: the
// caching host allocator would round every chunk's buffer up to a power of two).
#include "swap.h"

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <algorithm>

#ifdef HIFT_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace hift {

namespace {

// Pins `t`'s memory in place; false (and no CUDA error left behind) where it cannot.
bool pin_in_place(const at::Tensor& t, std::string& why) {
#ifdef HIFT_WITH_CUDA
  const cudaError_t err =
      cudaHostRegister(t.data_ptr(), t.nbytes(), cudaHostRegisterDefault);
  if (err == cudaSuccess) return true;
  why = cudaGetErrorString(err);
  (void)cudaGetLastError();
  return false;
#else
  why = "this build of hift._C has no CUDA";
  return false;
#endif
}

void unpin(void* ptr) {
#ifdef HIFT_WITH_CUDA
  (void)cudaHostUnregister(ptr);
  (void)cudaGetLastError();
#else
  (void)ptr;
#endif
}

}  // namespace

StateSwapper::StateSwapper(std::vector<int64_t> chunk_numels, c10::Device device, int64_t slots,
                           bool pin, bool force_slots)
    : numels_(std::move(chunk_numels)), device_(device) {
  async_ = device_.type() != c10::DeviceType::CPU;
  use_slots_ = async_ || force_slots;
  TORCH_CHECK(!use_slots_ || slots >= 1, "StateSwapper: slots must be at least 1, got ", slots);
  for (size_t g = 0; g < numels_.size(); ++g) {
    TORCH_CHECK(numels_[g] >= 0, "StateSwapper: chunk ", g, " has a negative numel ", numels_[g]);
  }
  if (async_ && !device_.has_index()) {
    device_ = c10::impl::VirtualGuardImpl(device_.type()).getDevice();
  }
  slot_of_.assign(numels_.size(), -1);
  copied_in_.resize(numels_.size());
  host_busy_.resize(numels_.size());
  // Pinning makes a context on the current device: make it this swapper's.
  std::optional<c10::DeviceGuard> guard;
  if (async_) guard.emplace(device_);
  if (use_slots_) make_slots(slots);
  make_host_buffers(pin);
}

void StateSwapper::make_slots(int64_t slots) {
  const int64_t largest =
      numels_.empty() ? 0 : *std::max_element(numels_.begin(), numels_.end());
  slots_.resize(static_cast<size_t>(slots));
  for (Slot& slot : slots_) {
    slot.buffer = at::empty({largest}, at::TensorOptions().dtype(at::kFloat).device(device_));
  }
  if (!async_) return;
  c10::impl::VirtualGuardImpl impl(device_.type());
  copy_in_stream_ = impl.getStreamFromGlobalPool(device_, /*isHighPriority=*/false);
  copy_out_stream_ = impl.getStreamFromGlobalPool(device_, /*isHighPriority=*/false);
  // The slots come from the current stream's pool; the copy streams use them too, so the
  // caching allocator must not hand their memory out again before their copies are done.
  for (Slot& slot : slots_) {
    slot.buffer.record_stream(*copy_in_stream_);
    slot.buffer.record_stream(*copy_out_stream_);
  }
}

void StateSwapper::make_host_buffers(bool pin) {
  // A constructor that throws runs no destructor: what was pinned is unpinned here.
  try {
    pinned_ = pin && !numels_.empty();
    std::string why;
    for (int64_t numel : numels_) {
      at::Tensor buffer = at::zeros({numel}, at::TensorOptions().dtype(at::kFloat));
      if (pinned_ && numel > 0) {
        if (pin_in_place(buffer, why)) {
          registered_.push_back(buffer.data_ptr());
        } else {
          pinned_ = false;
        }
      }
      host_.push_back(std::move(buffer));
    }
    if (pin && !numels_.empty() && !pinned_) {
      for (void* ptr : registered_) unpin(ptr);
      registered_.clear();
      TORCH_WARN("hift StateSwapper: pinned host memory is not available (", why,
                 "); optimizer state stays in pageable memory, so copies to and from the device "
                 "are slower and not overlapped with compute.");
    }
  } catch (...) {
    for (void* ptr : registered_) unpin(ptr);
    registered_.clear();
    throw;
  }
}

StateSwapper::~StateSwapper() {
  try {
    close();
  } catch (...) {
    // The device is gone or broken; unpinning is still the right thing to try.
    for (void* ptr : registered_) unpin(ptr);
  }
}

void StateSwapper::close() {
  if (closed_) return;
  // Host memory must stay pinned and alive until no copy reads or writes it any more.
  synchronize();
  for (void* ptr : registered_) unpin(ptr);
  registered_.clear();
  pinned_ = false;
  closed_ = true;
  host_.clear();
  for (Slot& slot : slots_) {  // (the count stays: num_slots() still says what there was)
    slot.buffer = at::Tensor();
    slot.copied_out.reset();
  }
  copied_in_.assign(numels_.size(), nullptr);
  host_busy_.assign(numels_.size(), nullptr);
}

void StateSwapper::check_open(const char* what) const {
  TORCH_CHECK(!closed_, "StateSwapper: ", what, " after close(); the swapper's buffers are gone");
}

void StateSwapper::check_chunk(int64_t chunk) const {
  TORCH_CHECK(chunk >= 0 && chunk < num_chunks(), "StateSwapper: chunk ", chunk,
              " is out of range (", num_chunks(), " chunks)");
}

c10::Stream StateSwapper::current_stream() const {
  return c10::impl::VirtualGuardImpl(device_.type()).getStream(device_);
}

std::shared_ptr<c10::Event> StateSwapper::record_on(const c10::Stream& stream) {
  auto event = std::make_shared<c10::Event>(device_.type());
  event->record(stream);
  return event;
}

bool StateSwapper::resident(int64_t chunk) const {
  check_open("resident()");
  check_chunk(chunk);
  return !use_slots_ || slot_of_[chunk] >= 0;
}

at::Tensor StateSwapper::host(int64_t chunk) {
  check_open("host()");
  check_chunk(chunk);
  wait_for_host(chunk);
  std::lock_guard<std::mutex> lock(host_busy_mutex_);
  host_busy_[chunk].reset();
  return host_[chunk];
}

void StateSwapper::wait_for_host(int64_t chunk) const {
  check_open("wait_for_host()");
  check_chunk(chunk);
  std::shared_ptr<c10::Event> busy;
  {
    std::lock_guard<std::mutex> lock(host_busy_mutex_);
    busy = host_busy_[chunk];
  }
  if (busy) busy->synchronize();  // outside the lock: the enqueuing thread is not held up
}

int64_t StateSwapper::take_free_slot(int64_t chunk) {
  // A never-used slot first, else the one released longest ago (its copy-out is the oldest).
  int64_t best = -1;
  for (int64_t s = 0; s < num_slots(); ++s) {
    const Slot& slot = slots_[s];
    if (slot.resident) continue;
    if (slot.owner < 0) return s;
    if (best < 0 || slot.freed_at < slots_[best].freed_at) best = s;
  }
  TORCH_CHECK(best >= 0, "StateSwapper: cannot prefetch chunk ", chunk, ": all ", num_slots(),
              " slots hold chunks that were not written back (writeback() one first)");
  return best;
}

void StateSwapper::prefetch(int64_t chunk) {
  check_open("prefetch()");
  check_chunk(chunk);
  if (!use_slots_ || slot_of_[chunk] >= 0) return;
  const int64_t s = take_free_slot(chunk);
  Slot& slot = slots_[s];
  at::Tensor dst = slot.buffer.narrow(0, 0, numels_[chunk]);
  if (async_) {
    c10::StreamGuard guard(*copy_in_stream_);
    // The copy-out stream may still read the slot, or write host(chunk) (K=1).
    if (slot.copied_out) slot.copied_out->block(*copy_in_stream_);
    if (host_busy_[chunk]) host_busy_[chunk]->block(*copy_in_stream_);
    dst.copy_(host_[chunk], /*non_blocking=*/true);
    copied_in_[chunk] = record_on(*copy_in_stream_);
    std::lock_guard<std::mutex> lock(host_busy_mutex_);
    host_busy_[chunk] = copied_in_[chunk];
  } else {
    dst.copy_(host_[chunk]);
  }
  bytes_h2d_ += static_cast<int64_t>(dst.nbytes());
  slot.copied_out.reset();
  slot.owner = chunk;
  slot.resident = true;
  slot_of_[chunk] = s;
}

at::Tensor StateSwapper::acquire(int64_t chunk) {
  check_open("acquire()");
  check_chunk(chunk);
  if (!use_slots_) return host_[chunk];
  prefetch(chunk);
  if (copied_in_[chunk]) copied_in_[chunk]->block(current_stream());
  return slots_[slot_of_[chunk]].buffer.narrow(0, 0, numels_[chunk]);
}

void StateSwapper::writeback(int64_t chunk) {
  check_open("writeback()");
  check_chunk(chunk);
  if (!use_slots_) return;
  const int64_t s = slot_of_[chunk];
  TORCH_CHECK(s >= 0, "StateSwapper: writeback of chunk ", chunk,
              ", which is not on the device (prefetch/acquire it first)");
  Slot& slot = slots_[s];
  at::Tensor src = slot.buffer.narrow(0, 0, numels_[chunk]);
  if (async_) {
    // (this chunk's copy-in is behind the update already: acquire made it wait)
    std::shared_ptr<c10::Event> computed = record_on(current_stream());
    c10::StreamGuard guard(*copy_out_stream_);
    computed->block(*copy_out_stream_);
    host_[chunk].copy_(src, /*non_blocking=*/true);
    slot.copied_out = record_on(*copy_out_stream_);
    std::lock_guard<std::mutex> lock(host_busy_mutex_);
    host_busy_[chunk] = slot.copied_out;
  } else {
    host_[chunk].copy_(src);
  }
  bytes_d2h_ += static_cast<int64_t>(src.nbytes());
  copied_in_[chunk].reset();
  slot.resident = false;
  slot.freed_at = ++writebacks_;
  slot_of_[chunk] = -1;
}

void StateSwapper::synchronize() {
  if (closed_) return;  // close() already waited for every copy
  if (copy_in_stream_) copy_in_stream_->synchronize();
  if (copy_out_stream_) copy_out_stream_->synchronize();
  std::lock_guard<std::mutex> lock(host_busy_mutex_);
  for (auto& event : host_busy_) event.reset();
}

void register_state_swapper(torch::Library& m) {
  m.class_<StateSwapper>("StateSwapper")
      .def(torch::init<std::vector<int64_t>, c10::Device, int64_t, bool, bool>())
      .def("host", &StateSwapper::host)
      .def("wait_for_host", &StateSwapper::wait_for_host)
      .def("prefetch", &StateSwapper::prefetch)
      .def("acquire", &StateSwapper::acquire)
      .def("writeback", &StateSwapper::writeback)
      .def("synchronize", &StateSwapper::synchronize)
      .def("close", &StateSwapper::close)
      .def("resident", &StateSwapper::resident)
      .def("pinned", &StateSwapper::pinned)
      .def("uses_slots", &StateSwapper::uses_slots)
      .def("num_chunks", &StateSwapper::num_chunks)
      .def("num_slots", &StateSwapper::num_slots)
      .def("bytes_copied", &StateSwapper::bytes_copied)
      .def("reset_bytes_copied", &StateSwapper::reset_bytes_copied);
}

}  // namespace hift
