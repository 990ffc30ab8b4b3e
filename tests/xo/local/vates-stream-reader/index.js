'use strict'

// vdifs' own minimal stand-in for @vates/stream-reader, which vhd-lib 4.15.0
// declares but which the npm registry does not serve. vhd-lib only uses it in
// vhdStreamValidator.js (not reached by tests/xo/restore.mjs).
//
// new StreamReader(source): source is a readable stream or any async iterable
// of Buffers.
//   read([size])       next chunk, or `size` bytes; fewer at the end; null when
//                      the stream has ended and nothing was read
//   readStrict([size]) like read() but throws if the stream ends first
//   skip(size)         drops up to `size` bytes, returns how many were dropped
//   skipStrict(size)   like skip() but throws if the stream ends first
class StreamReader {
  #iterator
  #pending = [] // buffered chunks, oldest first
  #pendingLength = 0
  #ended = false

  constructor(source) {
    this.#iterator = source[Symbol.asyncIterator]()
  }

  // Buffer more data; false once the source has ended.
  async #fill() {
    if (this.#ended) {
      return false
    }
    const { done, value } = await this.#iterator.next()
    if (done) {
      this.#ended = true
      return false
    }
    const chunk = Buffer.isBuffer(value) ? value : Buffer.from(value)
    if (chunk.length !== 0) {
      this.#pending.push(chunk)
      this.#pendingLength += chunk.length
    }
    return true
  }

  // Remove and return `size` bytes (or all that is buffered, if less).
  #take(size) {
    const n = Math.min(size, this.#pendingLength)
    const parts = []
    let missing = n
    while (missing > 0) {
      const head = this.#pending[0]
      if (head.length <= missing) {
        parts.push(head)
        this.#pending.shift()
        missing -= head.length
      } else {
        parts.push(head.subarray(0, missing))
        this.#pending[0] = head.subarray(missing)
        missing = 0
      }
    }
    this.#pendingLength -= n
    return parts.length === 1 ? parts[0] : Buffer.concat(parts, n)
  }

  async read(size) {
    if (size === undefined) {
      while (this.#pendingLength === 0) {
        if (!(await this.#fill())) {
          return null
        }
      }
      return this.#take(this.#pendingLength)
    }
    while (this.#pendingLength < size && (await this.#fill())) {
      // keep filling
    }
    if (this.#pendingLength === 0) {
      return size === 0 ? Buffer.alloc(0) : null
    }
    return this.#take(size)
  }

  async readStrict(size) {
    const chunk = await this.read(size)
    const got = chunk === null ? 0 : chunk.length
    if (chunk === null || (size !== undefined && got < size)) {
      const error = new Error(`stream has ended with not enough data (actual: ${got}, expected: ${size})`)
      error.chunk = chunk
      throw error
    }
    return chunk
  }

  async skip(size) {
    let skipped = 0
    while (skipped < size) {
      if (this.#pendingLength === 0 && !(await this.#fill())) {
        break
      }
      skipped += this.#take(size - skipped).length
    }
    return skipped
  }

  async skipStrict(size) {
    const skipped = await this.skip(size)
    if (skipped < size) {
      const error = new Error(`stream has ended with not enough data (actual: ${skipped}, expected: ${size})`)
      error.bytesSkipped = skipped
      throw error
    }
  }
}

module.exports = StreamReader
