// StateSwapper: each group's optimizer state as one flat fp32 host buffer (pinned where the
// system allows), and a few device slots it is copied into for the group's update.
//
// Copies run on one side stream, so copies into and out of a slot are ordered among themselves;
// the compute stream and the side stream meet only through events:
//   prefetch(g)  side stream: H2D of host(g) into a free slot, then event in[g]
//   acquire(g)   compute stream waits on in[g]
//   writeback(g) side stream waits for the compute stream, D2H into host(g), then event out[slot];
//                the slot is free for another group once out[slot] completes (stream order)
//   host(g)      the host waits for the last copy that touched host(g), if still in flight
//   close()      waits for every copy, then unpins the host buffers and lets go of all buffers;
//                idempotent, and the destructor does it too. host, prefetch, acquire, writeback
//                and resident throw after it (synchronize has nothing left to do).
// On a CPU device the copies are plain synchronous copies; with use_slots=false acquire() hands
// out the host buffer itself.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <memory>
#include <optional>
#include <vector>

namespace hift {

class StateSwapper : public torch::CustomClassHolder {
 public:
  StateSwapper(std::vector<int64_t> group_numels, c10::Device device, int64_t slots, bool pin,
               bool force_slots);
  ~StateSwapper() override;

  at::Tensor host(int64_t group);
  void prefetch(int64_t group);
  at::Tensor acquire(int64_t group);
  void writeback(int64_t group);
  void synchronize();
  void close();

  bool resident(int64_t group) const;
  bool pinned() const { return pinned_; }
  bool uses_slots() const { return use_slots_; }
  int64_t num_groups() const { return static_cast<int64_t>(numels_.size()); }
  int64_t num_slots() const { return static_cast<int64_t>(slots_.size()); }

 private:
  struct Slot {
    at::Tensor buffer;
    int64_t owner = -1;      // the group whose data the slot holds (or last held)
    bool resident = false;   // holds `owner` between prefetch and writeback
    uint64_t freed_at = 0;   // writeback counter when it was released; the oldest is reused first
    std::shared_ptr<c10::Event> copied_out;
  };

  void check_group(int64_t group) const;
  void check_open(const char* what) const;
  int64_t take_free_slot(int64_t group);
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
  std::vector<int64_t> slot_of_;  // group -> slot while resident, else -1
  std::vector<std::shared_ptr<c10::Event>> copied_in_;
  std::vector<std::shared_ptr<c10::Event>> host_busy_;  // last copy reading or writing host(g)
  std::optional<c10::Stream> copy_stream_;
  uint64_t writebacks_ = 0;
};

// Adds torch.classes.hift.StateSwapper to the library (called from ops.cpp).
void register_state_swapper(torch::Library& m);

}  // namespace hift
