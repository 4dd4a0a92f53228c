// Kernels templated on a small count (activation rows, output tiles, query heads) are instantiated
// once per count and picked at run time: with_count<Max>(n, f) calls f(std::integral_constant<int,
// N>{}) with N = n for 1 <= n <= Max, and N = Max for n > Max (n < 1 gives 1; callers skip 0).
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

template <int Max, typename F>
inline void with_count(int64_t n, F&& f) {
  if constexpr (Max > 1) {
    if (n < Max) return with_count<Max - 1>(n, std::forward<F>(f));
  }
  f(std::integral_constant<int, Max>{});
}
