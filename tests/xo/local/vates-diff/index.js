'use strict'

// vdifs' own minimal stand-in for @vates/diff, which vhd-lib 4.15.0 declares
// but which the npm registry does not serve. vhd-lib only uses it in
// vhdStreamValidator.js (not reached by tests/xo/restore.mjs).
//
// diff(a, b[, onDiff]) compares two indexable collections (Buffer, string,
// array, TypedArray) and reports where `b` differs from `a`: for each run of
// differing positions in their common length, (start, b.slice(start, end));
// then, if the lengths differ, (shorter length, rest of b) -- an empty slice
// when `b` is the shorter one. With `onDiff` each pair is passed to it,
// otherwise a flat array [start, slice, start, slice, ...] is returned.
module.exports = function diff(a, b, onDiff) {
  const result = []
  const report =
    onDiff ??
    ((index, slice) => {
      result.push(index, slice)
    })
  const common = Math.min(a.length, b.length)
  let i = 0
  while (i < common) {
    if (a[i] === b[i]) {
      ++i
      continue
    }
    const start = i
    while (i < common && a[i] !== b[i]) {
      ++i
    }
    report(start, b.slice(start, i))
  }
  if (a.length !== b.length) {
    report(common, b.slice(common))
  }
  return onDiff === undefined ? result : undefined
}
