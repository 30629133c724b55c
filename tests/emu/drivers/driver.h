// The I/O of the emulated-kernel drivers. tests/emulation.py writes a case directory:
//   case.txt   one item per line:  seed N | scalar NAME VALUE | input NAME FILE OFFSET_BYTES |
//              output NAME BYTES
//   *.bin      raw bytes of each input (a tensor's whole storage; OFFSET_BYTES locates the view)
// A driver reads its scalars and inputs, calls the kernel's launcher (the very function the
// extension calls), and finish() writes every output to NAME.bin plus, on stdout, the launch
// status, the launch log and the emulator's issues.
//
// Every input and output sits at the end of its own mapping, right before a PROT_NONE page, so a
// plain load or store past its end faults (the driver dies with SIGSEGV) instead of reading or
// clobbering a neighbour; outputs start as 0xFF bytes (NaN, or -1), so unwritten elements show.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <emu/runtime.h>

namespace emu_driver {

struct Region {
  uint8_t* data;
  size_t bytes;
};

// `bytes` of memory ending 0..15 bytes before a PROT_NONE page; 16-byte aligned start.
inline Region guarded(size_t bytes) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t padded = (bytes + 15) / 16 * 16;
  const size_t span = (padded + page - 1) / page * page + page;
  void* base = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) emu::fail("cannot map a buffer");
  uint8_t* guard = static_cast<uint8_t*>(base) + span - page;
  mprotect(guard, page, PROT_NONE);
  return {guard - padded, bytes};
}

class Case {
 public:
  Case(int argc, char** argv) {
    if (argc < 2) emu::fail("usage: driver CASE_DIR");
    dir_ = argv[1];
    std::ifstream in(dir_ + "/case.txt");
    if (!in) emu::fail("cannot read " + dir_ + "/case.txt");
    std::string line;
    while (std::getline(in, line)) {
      std::istringstream ls(line);
      std::string kind, name;
      ls >> kind;
      if (kind == "seed") {
        ls >> emu::seed();
      } else if (kind == "scalar") {
        ls >> name;
        ls >> scalars_[name];
      } else if (kind == "input") {
        std::string file;
        size_t offset = 0;
        ls >> name >> file >> offset;
        load_input(name, dir_ + "/" + file, offset);
      } else if (kind == "output") {
        size_t bytes = 0;
        ls >> name >> bytes;
        Region r = guarded(bytes);
        std::memset(r.data, 0xFF, (bytes + 15) / 16 * 16);
        outputs_.push_back({name, r});
      } else if (!kind.empty()) {
        emu::fail("unknown case item: " + line);
      }
    }
  }

  bool has(const std::string& name) const { return scalars_.count(name) != 0; }
  const std::string& text(const std::string& name) const { return get(name); }
  int64_t i64(const std::string& name) const { return static_cast<int64_t>(std::stoll(get(name))); }
  double f64(const std::string& name) const { return std::stod(get(name)); }

  // The view of input `name` (its storage plus the view's byte offset), or null if not given.
  template <class T = void>
  T* in(const std::string& name) {
    auto it = inputs_.find(name);
    return it == inputs_.end() ? nullptr : reinterpret_cast<T*>(it->second);
  }
  template <class T = void>
  T* out(const std::string& name) {
    for (auto& [n, r] : outputs_) {
      if (n == name) return reinterpret_cast<T*>(r.data);
    }
    emu::fail("no output named " + name);
  }
  // Scratch the launcher gets (e.g. a workspace), garbage-filled and guarded like the rest.
  void* scratch(size_t bytes) {
    Region r = guarded(bytes);
    std::memset(r.data, 0xFF, (bytes + 15) / 16 * 16);
    return r.data;
  }

  // Writes the outputs and the report; the exit status is 0 unless writing failed.
  int finish(cudaError_t status) {
    for (auto& [name, r] : outputs_) {
      std::ofstream f(dir_ + "/" + name + ".bin", std::ios::binary);
      f.write(reinterpret_cast<const char*>(r.data), static_cast<std::streamsize>(r.bytes));
      if (!f) emu::fail("cannot write output " + name);
      for (size_t i = r.bytes; i < (r.bytes + 15) / 16 * 16; ++i) {
        if (r.data[i] != 0xFF) emu::report("write past the end of output " + name);
      }
    }
    std::printf("status %d\n", status);
    for (const auto& l : emu::launch_log()) {
      std::printf("launch %u %u %u %u %zu\n", l.grid.x, l.grid.y, l.grid.z, l.block.x, l.smem);
    }
    for (const auto& [what, n] : emu::issues()) std::printf("issue %d %s\n", n, what.c_str());
    std::fflush(stdout);
    return 0;
  }

 private:
  const std::string& get(const std::string& name) const {
    auto it = scalars_.find(name);
    if (it == scalars_.end()) emu::fail("missing scalar " + name);
    return it->second;
  }

  void load_input(const std::string& name, const std::string& path, size_t offset) {
    std::ifstream f(path, std::ios::binary | std::ios::ate);
    if (!f) emu::fail("cannot read " + path);
    const size_t bytes = static_cast<size_t>(f.tellg());
    f.seekg(0);
    Region r = guarded(bytes);
    f.read(reinterpret_cast<char*>(r.data), static_cast<std::streamsize>(bytes));
    emu::buffers().push_back({r.data, bytes});
    inputs_[name] = r.data + offset;
  }

  std::string dir_;
  std::map<std::string, std::string> scalars_;
  std::map<std::string, uint8_t*> inputs_;
  std::vector<std::pair<std::string, Region>> outputs_;
};

}  // namespace emu_driver
