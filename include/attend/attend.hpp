// SPDX-License-Identifier: MIT
/// \file attend.hpp
/// \brief Umbrella header: every public part of attend.
#pragma once

#include "version.hpp"
#include "config.hpp"
#include "types.hpp"
#include "options.hpp"
#include "softmax.hpp"
#include "masks.hpp"
#include "scores.hpp"
#include "scores/additive.hpp"
#include "scores/soft_cap.hpp"
#include "biases.hpp"
#include "custom.hpp"
#include "attention/materialized.hpp"
#include "attention/blocked.hpp"
#include "attention/scaled_dot_product.hpp"
#include "attention/batched.hpp"
#include "attention/multi_head.hpp"
#include "attention/split_kv.hpp"
#include "attention/sinks.hpp"
#include "attention/kv_cache.hpp"
#include "attention/paged_kv_cache.hpp"
#include "positional/sinusoidal.hpp"
#include "positional/rotary.hpp"
#include "attention/additive.hpp"
#include "attention/dot_family.hpp"
#include "attention/local_window.hpp"
#include "attention/top_k.hpp"
#include "attention/backward.hpp"
#include "attention/additive_backward.hpp"
#include "attention/multi_head_training.hpp"

// Users of attend::precompiled (which defines this) call its compiled cores (extern_templates.hpp).
#ifdef ATTEND_EXTERN_TEMPLATES
#include "extern_templates.hpp"
#endif
