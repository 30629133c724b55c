// Prompt lookup (Saxena 2023; llama.cpp's lookup decoding) for greedy drafting: where a
// sequence's last n tokens occurred before in its own context, the token that followed them
// then is the guess for the next one. Decoding loops, repeated identifiers and copied lines are
// where a small draft model guesses worst and this guesses best; the target's verification
// keeps the output lossless whichever proposes.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace pearlmoe::cpu {

// Each sequence's tokens so far: committed ones, then any drafts not yet verified.
using Contexts = std::vector<std::vector<int64_t>>;

// The token after the latest earlier occurrence of the context's last n tokens, or -1.
inline int64_t lookup_next(const std::vector<int64_t>& ctx, int64_t n) {
  const auto len = static_cast<int64_t>(ctx.size());
  if (n <= 0 || len <= n) return -1;
  const int64_t* key = ctx.data() + len - n;
  for (int64_t s = len - n - 1; s >= 0; --s) {
    if (std::equal(key, key + n, ctx.data() + s)) return ctx[s + n];
  }
  return -1;
}

// A verified window's drafts of the draft model's own (made[i] 1; 0 where the lookup drafted),
// for a γ policy that prices the model's drafts only: of the first n, those the target tested
// (up to and including the first rejected one) are added to tested, the accepted ones among
// them to accepted.
inline void count_model_drafts(const uint8_t* made, int64_t n, int64_t accepted, int64_t& tested,
                               int64_t& accepted_made) {
  for (int64_t i = 0; i < std::min(accepted + 1, n); ++i) {
    tested += made[i];
    accepted_made += i < accepted ? made[i] : 0;
  }
}

}  // namespace pearlmoe::cpu
