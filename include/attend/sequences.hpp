// SPDX-License-Identifier: MIT
/// \file sequences.hpp
/// \brief Where the sequences of a batch lie in one matrix of token rows: packed one after the
/// other (FlashAttention's cu_seqlens) or padded to a common length, read in place.
#pragma once

#include "config.hpp"
#include "masks.hpp"
#include "types.hpp"

#include <algorithm>
#include <string>
#include <vector>

namespace attend {

/// The rows of a batch: sequence b is rows [begin(b), begin(b) + length(b)) of a matrix with one
/// token per row. Sequences do not overlap; rows that belong to none (padding) are never read.
class SequenceRows {
 public:
  /// Packed sequences: `offsets` = [0, L_0, L_0 + L_1, ..., total], B + 1 non-decreasing offsets
  /// of any integer type (FlashAttention's cu_seqlens); sequence b is rows [offsets[b], offsets[b+1]).
  /// \throws attend::invalid_argument on fewer than one offset, a first offset other than 0, or a
  ///         decreasing or negative one.
  template <class Offsets>
  static SequenceRows packed(const Offsets& offsets) {
    const std::vector<Index> o = detail::index_vector(offsets, "sequence offsets");
    ATTEND_CHECK(!o.empty() && o[0] == 0, "sequence offsets must start with 0 (cu_seqlens: B + 1 entries)");
    SequenceRows rows;
    for (std::size_t b = 0; b + 1 < o.size(); ++b) {
      ATTEND_CHECK(o[b + 1] >= o[b], "sequence offsets must not decrease: offsets[" + std::to_string(b + 1) + "] = " +
                                         std::to_string(o[b + 1]) + " < offsets[" + std::to_string(b) + "] = " +
                                         std::to_string(o[b]));
      rows.begins_.push_back(o[b]);
      rows.lengths_.push_back(o[b + 1] - o[b]);
    }
    return rows;
  }

  /// Padded sequences: sequence b starts at row b * padded_length and holds its first lengths[b]
  /// rows (any integer type); the rest of its block is padding, never read.
  /// \throws attend::invalid_argument when a length is negative or exceeds padded_length.
  template <class Lengths>
  static SequenceRows padded(Index padded_length, const Lengths& lengths) {
    const std::vector<Index> l = detail::index_vector(lengths, "sequence lengths");
    SequenceRows rows;
    for (std::size_t b = 0; b < l.size(); ++b) {
      ATTEND_CHECK(l[b] <= padded_length, "sequence lengths[" + std::to_string(b) + "] = " + std::to_string(l[b]) +
                                              " exceeds the padded length " + std::to_string(padded_length));
      rows.begins_.push_back(Index(b) * padded_length);
      rows.lengths_.push_back(l[b]);
    }
    return rows;
  }

  /// B sequences of `length` rows each, one after the other.
  static SequenceRows uniform(Index batch_size, Index length) {
    ATTEND_CHECK(batch_size >= 0 && length >= 0, "batch_size=" + std::to_string(batch_size) + " and length=" +
                                                     std::to_string(length) + " must not be negative");
    return padded(length, std::vector<Index>(std::size_t(batch_size), length));
  }

  Index size() const { return Index(begins_.size()); }  ///< B
  Index begin(Index b) const { return begins_[std::size_t(b)]; }
  Index length(Index b) const { return lengths_[std::size_t(b)]; }

  /// One past the last row of any sequence (an empty one counts at its start): the matrix
  /// needs at least this many rows.
  Index rows_used() const {
    Index end = 0;
    for (std::size_t b = 0; b < begins_.size(); ++b) end = std::max(end, begins_[b] + lengths_[b]);
    return end;
  }

 private:
  std::vector<Index> begins_, lengths_;
};

}  // namespace attend
