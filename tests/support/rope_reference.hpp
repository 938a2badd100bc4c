// SPDX-License-Identifier: MIT
// YaRN as Hugging Face transformers computes it, written out in long double from
// `modeling_rope_utils._compute_yarn_parameters` and `apply_rotary_pos_emb`, independently of
// attend's RotaryEmbedding: the frequencies of the first `dim` (rotary) features and the
// attention factor that multiplies cos and sin.
#pragma once

#include "reference.hpp"

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace attend::test {

/// rope_scaling = {"rope_type": "yarn", "factor": ..., "original_max_position_embeddings": ...,
/// "beta_fast": ..., "beta_slow": ..., "attention_factor": ... (optional)}.
struct HfYarnConfig {
  Real factor;
  Index original_max_position;
  Real beta_fast = 32;
  Real beta_slow = 1;
  std::optional<Real> attention_factor;
};

/// `_compute_yarn_parameters`' (inv_freq, attention_factor) for `dim` rotated features.
struct HfYarnParameters {
  std::vector<Real> inv_freq;  // (dim / 2)
  Real attention_factor;
};

inline HfYarnParameters hf_yarn_parameters(Index dim, Real base, const HfYarnConfig& c) {
  const Real pi = 3.141592653589793238462643383279502884L;
  // get_mscale(factor) = 0.1 ln(factor) + 1 (1 for factor <= 1), unless given.
  const Real attention_factor = c.attention_factor ? *c.attention_factor
                                : c.factor <= 1    ? Real(1)
                                                   : Real(0.1) * std::log(c.factor) + 1;
  // find_correction_dim: the feature index whose pair turns `rotations` times over the context.
  const auto correction_dim = [&](Real rotations) {
    return Real(dim) * std::log(Real(c.original_max_position) / (rotations * 2 * pi)) / (2 * std::log(base));
  };
  // find_correction_range with truncate = True.
  const Real low = std::max(std::floor(correction_dim(c.beta_fast)), Real(0));
  Real high = std::min(std::ceil(correction_dim(c.beta_slow)), Real(dim - 1));
  if (low == high) high += Real(0.001);  // linear_ramp_factor's guard
  HfYarnParameters p{std::vector<Real>(std::size_t(dim / 2)), attention_factor};
  for (std::size_t i = 0; i < p.inv_freq.size(); ++i) {
    const Real pos_freq = std::pow(base, Real(2 * i) / Real(dim));  // base^(arange(0, dim, 2) / dim)
    const Real extrapolation = 1 / pos_freq, interpolation = 1 / (c.factor * pos_freq);
    const Real ramp = std::clamp((Real(i) - low) / (high - low), Real(0), Real(1));  // linear_ramp_factor
    const Real extrapolation_factor = 1 - ramp;
    p.inv_freq[i] = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor;
  }
  return p;
}

}  // namespace attend::test
