// StateSwapper: each chunk of optimizer state as one flat fp32 host buffer (pinned where the
// system allows), and a few device slots it is copied into for the chunk's update. The chunks are
// the caller's (hift/store.py): HostStore's are the state's chunks, DiskStore's its staging slots.
//
// Copies run on two side streams, one per direction, so that the copy-out of one chunk and the
// copy-in of another use both copy engines at once; the streams meet each other and the compute
// stream only through events:
//   prefetch(c)  copy-in stream waits on out[slot] and on the last copy-out into host(c), then
//                H2D of host(c) into a free slot, then event in[c]
//   acquire(c)   compute stream waits on in[c]
//   writeback(c) copy-out stream waits for the compute stream, D2H into host(c), then event
//                out[slot]; the slot is free for another chunk once out[slot] completes
//   host(c)      the host waits for the last copy that touched host(c), if still in flight
//   wait_for_host(c) the same wait, changing nothing: another thread (the disk store's I/O
//                workers) may call it while this one enqueues copies
//   bytes_copied() [H2D, D2H] bytes of the copies made (plain copies on the CPU too) since
//                construction or reset_bytes_copied()
//   close()      waits for every copy, then unpins the host buffers and lets go of all buffers;
//                idempotent, and the destructor does it too. host, prefetch, acquire, writeback
//                and resident throw after it (synchronize has nothing left to do).
// On a CPU device the copies are plain synchronous copies; with use_slots=false acquire() hands
// out the host buffer itself. The constructor works under the swapper's device (pinning makes a
// context on the current one) and allocates the device slots before it pins any host memory, so
// that running out of device memory leaves nothing pinned.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <memory>
#include <mutex>
#include <optional>
#include <vector>

namespace hift {

class StateSwapper : public torch::CustomClassHolder {
 public:
  StateSwapper(std::vector<int64_t> chunk_numels, c10::Device device, int64_t slots, bool pin,
               bool force_slots);
  ~StateSwapper() override;

  at::Tensor host(int64_t chunk);
  void wait_for_host(int64_t chunk) const;
  void prefetch(int64_t chunk);
  at::Tensor acquire(int64_t chunk);
  void writeback(int64_t chunk);
  void synchronize();
  void close();

  bool resident(int64_t chunk) const;
  bool pinned() const { return pinned_; }
  bool uses_slots() const { return use_slots_; }
  int64_t num_chunks() const { return static_cast<int64_t>(numels_.size()); }
  int64_t num_slots() const { return static_cast<int64_t>(slots_.size()); }
  std::vector<int64_t> bytes_copied() const { return {bytes_h2d_, bytes_d2h_}; }
  void reset_bytes_copied() { bytes_h2d_ = bytes_d2h_ = 0; }

 private:
  struct Slot {
    at::Tensor buffer;
    int64_t owner = -1;      // the chunk whose data the slot holds (or last held)
    bool resident = false;   // holds `owner` between prefetch and writeback
    uint64_t freed_at = 0;   // writeback counter when it was released; the oldest is reused first
    std::shared_ptr<c10::Event> copied_out;
  };

  void make_slots(int64_t slots);
  void make_host_buffers(bool pin);
  void check_chunk(int64_t chunk) const;
  void check_open(const char* what) const;
  int64_t take_free_slot(int64_t chunk);
  std::shared_ptr<c10::Event> record_on(const c10::Stream& stream);
  c10::Stream current_stream() const;

  std::vector<int64_t> numels_;
  c10::Device device_;
  bool use_slots_;
  bool async_;  // device has streams and events (not the CPU)
  bool pinned_ = false;
  bool closed_ = false;
  std::vector<at::Tensor> host_;
  std::vector<void*> registered_;  // host pointers pinned by cudaHostRegister, unpinned on exit
  std::vector<Slot> slots_;
  std::vector<int64_t> slot_of_;  // chunk -> slot while resident, else -1
  std::vector<std::shared_ptr<c10::Event>> copied_in_;
  std::vector<std::shared_ptr<c10::Event>> host_busy_;  // last copy reading or writing host(g)
  mutable std::mutex host_busy_mutex_;  // host_busy_ is read by wait_for_host from other threads
  std::optional<c10::Stream> copy_in_stream_;   // H2D
  std::optional<c10::Stream> copy_out_stream_;  // D2H
  uint64_t writebacks_ = 0;
  int64_t bytes_h2d_ = 0;
  int64_t bytes_d2h_ = 0;
};

// Adds torch.classes.hift.StateSwapper to the library (called from ops.cpp).
void register_state_swapper(torch::Library& m);

}  // namespace hift
