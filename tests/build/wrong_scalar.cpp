// SPDX-License-Identifier: MIT
// Compiled once per case by the tests build_wrong_scalar_<case>, which pass only when the first
// error the compiler reports is attend's static_assert (types.hpp), not one of Eigen's:
//   mixed        float queries with double keys and values
//   int          int matrices
//   complex      std::complex<double> matrices
//   long_double  long double matrices
//   layer        a decode step of a double layer fed float rows
//   bf16_layer_backward  the gradients of a bf16 MultiHeadAttention (a bf16 layer runs forward
//                and decode_step; its training entry points take float or double only)
#include <attend/attend.hpp>

#include <complex>

#if defined(ATTEND_CASE_MIXED)
using Q = attend::Matrix<float>;
using KV = attend::Matrix<double>;
#elif defined(ATTEND_CASE_INT)
using Q = attend::Matrix<int>;
using KV = Q;
#elif defined(ATTEND_CASE_COMPLEX)
using Q = attend::Matrix<std::complex<double>>;
using KV = Q;
#elif defined(ATTEND_CASE_LONG_DOUBLE)
using Q = attend::Matrix<long double>;
using KV = Q;
#endif

int main() {
#if defined(ATTEND_CASE_BF16_LAYER_BACKWARD)
  using bf16 = Eigen::bfloat16;
  const attend::MultiHeadWeights<bf16> weights{attend::Matrix<bf16>::Zero(4, 4), attend::Matrix<bf16>::Zero(4, 4),
                                               attend::Matrix<bf16>::Zero(4, 4), attend::Matrix<bf16>::Zero(4, 4),
                                               {}, {}, {}, {}};
  const attend::MultiHeadAttention<bf16> layer(1, weights);
  const attend::MultiHeadContext<bf16> context;
  const attend::Matrix<bf16> d_output = attend::Matrix<bf16>::Zero(2, 4);
  return int(attend::multi_head_layer_backward(layer, context, d_output).d_query.size());
#elif defined(ATTEND_CASE_LAYER)
  attend::MultiHeadWeights<double> weights;
  const attend::MultiHeadAttention<double> layer(1, weights);
  attend::KVCache<double> cache(layer, 4);
  const attend::Matrix<float> x = attend::Matrix<float>::Zero(1, 4);
  return int(attend::decode_step(layer, cache, x).size());
#else
  const Q q = Q::Zero(2, 4);
  const KV k = KV::Zero(3, 4), v = KV::Zero(3, 4);
  return int(attend::scaled_dot_product_attention(q, k, v).size());
#endif
}
