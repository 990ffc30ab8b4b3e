#!/usr/bin/env node
// Xen Orchestra's vhd-lib as a test oracle for vdifs: restore a VHD chain to raw.
//
//   node restore.mjs synthetic OUT.raw CHILD.vhd
//       Open the chain ending in CHILD.vhd with VhdSynthetic.fromVhdChain (each
//       parent is the file named by the header's parentUnicodeName, relative to
//       its child's directory, down to a dynamic VHD) and write its raw content.
//   node restore.mjs merge OUT.raw PARENT.vhd CHILD1.vhd ... CHILDN.vhd
//       Copy the files to a scratch directory, merge them there with vhd-lib's
//       mergeVhdChain (the merged VHD takes CHILDN's name), and write the raw
//       content of that one merged VHD (a differencing result gives only its own
//       blocks).
//
// The raw content is vhd-lib's VhdAbstract.rawContent(): footer.currentSize
// bytes, zeros for unallocated blocks. Exit status: 0 on success, 1 on any
// error (vhd-lib's message on stderr), 2 on a usage error.
import { createRequire } from 'node:module'
import { createWriteStream } from 'node:fs'
import fs from 'node:fs/promises'
import os from 'node:os'
import path from 'node:path'
import { pipeline } from 'node:stream/promises'

const require = createRequire(import.meta.url)
const { VhdSynthetic, openVhd } = require('vhd-lib')
const { mergeVhdChain } = require('vhd-lib/merge.js')
const { getHandler } = require('@xen-orchestra/fs')

const USAGE = `usage: node restore.mjs synthetic OUT.raw CHILD.vhd
       node restore.mjs merge OUT.raw PARENT.vhd CHILD1.vhd [... CHILDN.vhd]`

class UsageError extends Error {}

// A Disposable from vhd-lib / promise-toolbox is a promise of { value, dispose }.
async function using(disposable, fn) {
  const resource = await disposable
  try {
    return await fn(resource.value)
  } finally {
    await resource.dispose()
  }
}

// An @xen-orchestra/fs local handler (a "file://" remote) rooted at `dir`.
// readOnly: every file is opened with flags 'r' (vhd-lib asks for 'r+' even to
// read), so read-only inputs such as files on a vdifs mount can be used.
async function withHandler(dir, { readOnly }, fn) {
  const handler = getHandler({ url: `file://${dir}` })
  if (readOnly) {
    const openFile = handler.openFile.bind(handler)
    handler.openFile = file => openFile(file, 'r')
  }
  await handler.sync()
  try {
    return await fn(handler)
  } finally {
    await handler.forget()
  }
}

async function withScratchDir(fn) {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'vdifs-xo-'))
  try {
    return await fn(dir)
  } finally {
    await fs.rm(dir, { recursive: true, force: true })
  }
}

// Write vhd.rawContent() to `out` and check it is exactly the virtual size.
async function writeRaw(vhd, out) {
  await vhd.readBlockAllocationTable()
  const size = vhd.footer.currentSize
  await pipeline(vhd.rawContent(), createWriteStream(out))
  const written = (await fs.stat(out)).size
  if (written !== size) {
    throw new Error(`vhd-lib's rawContent() gave ${written} bytes, virtual size is ${size}`)
  }
}

async function synthetic(out, child) {
  const childPath = path.resolve(child)
  const dir = path.dirname(childPath)
  await fs.access(childPath)
  // The handler needs a writable root (its sync() checks W_OK), so it is rooted
  // at a scratch directory of symlinks to every entry of CHILD's directory:
  // the parents resolve there exactly as beside CHILD, and nothing is written.
  await withScratchDir(async scratch => {
    for (const name of await fs.readdir(dir)) {
      await fs.symlink(path.join(dir, name), path.join(scratch, name))
    }
    await withHandler(scratch, { readOnly: true }, handler =>
      using(VhdSynthetic.fromVhdChain(handler, '/' + path.basename(childPath)), vhd => writeRaw(vhd, out))
    )
  })
}

async function merge(out, files) {
  const names = files.map(file => path.basename(file))
  if (new Set(names).size !== names.length) {
    throw new UsageError(`merge: the VHDs must have distinct file names: ${names.join(' ')}`)
  }
  await withScratchDir(async scratch => {
    for (const file of files) {
      await fs.copyFile(file, path.join(scratch, path.basename(file)))
    }
    const chain = names.map(name => '/' + name)
    await withHandler(scratch, { readOnly: false }, async handler => {
      await mergeVhdChain(handler, chain, { removeUnused: true })
      // mergeVhdChain renamed the merged parent to the last child's name.
      const merged = chain[chain.length - 1]
      await using(openVhd(handler, merged, { flags: 'r' }), vhd => writeRaw(vhd, out))
    })
  })
}

async function main(argv) {
  const [command, out, ...vhds] = argv
  if (command === 'synthetic' && out !== undefined && vhds.length === 1) {
    await synthetic(out, vhds[0])
  } else if (command === 'merge' && out !== undefined && vhds.length >= 2) {
    await merge(out, vhds)
  } else {
    throw new UsageError(USAGE)
  }
}

main(process.argv.slice(2)).then(
  () => process.exit(0),
  error => {
    const usage = error instanceof UsageError
    console.error(usage ? error.message : `restore.mjs: ${error?.stack ?? error}`)
    process.exit(usage ? 2 : 1)
  }
)
