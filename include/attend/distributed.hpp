// SPDX-License-Identifier: MIT
/// \file distributed.hpp
/// \brief Umbrella header of attend's optional MPI component (CMake target attend::distributed):
/// sequence-parallel ring attention for prefill and decoding over a KV cache sharded across ranks.
/// Not included by attend.hpp: the core library never depends on MPI.
#pragma once

#include "attend.hpp"
#include "distributed/mpi.hpp"
#include "distributed/sharding.hpp"
#include "distributed/shard_mask.hpp"
#include "distributed/progress.hpp"
#include "distributed/ring.hpp"
#include "distributed/decode.hpp"
